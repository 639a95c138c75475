"""Change events: what one replica tells the others, and who listens here.

A write is announced on the token store's channel; every replica (this one
at once, the others when the message arrives) hands the parsed event to its
listeners, which drop or reload what they cache. Because a message can be
lost, the store's change counter is also polled, and a move of it is heard as
SERVERS_CHANGED. Listeners are subscribed in app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable

import structlog

from proxy import metrics
from proxy.names import SERVERS_CHANGED, Event, parse_event
from proxy.stores import Store, StoreUnavailable, TokenStore

log = structlog.get_logger("keybearer.events")

Listener = Callable[[Event], Awaitable[None] | None]


class ChangeFeed:
    def __init__(self, store: Store, tokens: TokenStore) -> None:
        self.store = store
        self.tokens = tokens
        self.listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._seen_changes: int | None = None

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    async def announce(self, *events: str) -> None:
        """Tell this replica, then every other one. A write is stored before it is
        announced, so a failed announcement is logged, not raised: the others
        find the change at their next poll."""
        for event in events:
            await self._dispatch(event)
        try:
            for event in events:
                await self.tokens.publish(event)
        except StoreUnavailable as exc:
            log.warning("change stored but not announced; other replicas see it at their next poll",
                        reason=str(exc))  # fmt: skip

    async def start(self) -> None:
        self._seen_changes = await self.store.changes()
        self._database_up(True)
        if self.tokens is not self.store:
            await self._check_tokens()
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._follow())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.store.poll_interval)
            if self.tokens is not self.store:
                await self._check_tokens()
            try:
                changes = await self.store.changes()
            except StoreUnavailable as exc:
                self._database_up(False)
                log.warning("store unavailable; serving from cache", reason=str(exc))
                continue
            self._database_up(True)
            if changes != self._seen_changes and await self._dispatch(SERVERS_CHANGED):
                # Only now: a reload that failed is retried at the next poll.
                self._seen_changes = changes

    # The poll doubles as the stores' health check (keybearer_store_up): the gauge
    # stays current without anyone calling /ready.
    def _database_up(self, up: bool) -> None:
        metrics.store_up("database", up)
        if self.tokens is self.store:  # one SQLite file holds both
            metrics.store_up("tokens", up)

    async def _check_tokens(self) -> None:
        try:
            await self.tokens.ping()
        except StoreUnavailable:
            metrics.store_up("tokens", False)  # the events channel logs the outage
        else:
            metrics.store_up("tokens", True)

    async def _follow(self) -> None:
        async for event in self.tokens.events():
            await self._dispatch(event)

    async def _dispatch(self, text: str) -> bool:
        """Hand the event to every listener; False when one of them failed."""
        event = parse_event(text)
        if event is None:
            return True
        ok = True
        for listener in self.listeners:
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except StoreUnavailable as exc:
                ok = False
                log.warning("store unavailable; serving from cache", event=text, reason=str(exc))
            except Exception as exc:
                # A listener that raised must not leave this replica deaf for good.
                ok = False
                log.error("event listener failed", event=text, error=type(exc).__name__, reason=str(exc))
        return ok
