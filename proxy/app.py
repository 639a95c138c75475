"""The ASGI application: the proxy's own routes, and everything else forwarded.

Requests whose first path segment is one of the proxy's reserved names go to
a small Starlette app (health, later admin and browser pages); all others go
straight to the forwarder, without a router in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy import admin, logs, metrics, routing
from proxy.crypto import Keyring
from proxy.forwarding import Forwarder
from proxy.management import Management
from proxy.oauth import flow
from proxy.oauth.connector import Connector
from proxy.registry import Registry
from proxy.settings import ConfigError, Settings, load_settings
from proxy.stores import StoreUnavailable, open_store, open_token_store
from proxy.upstream_policy import UpstreamPolicy

log = structlog.get_logger("keybearer")


class Keybearer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring = Keyring(settings.salt or "", settings.salt_previous)
        self.store = open_store(settings)
        self.tokens = open_token_store(settings, self.store)
        self.registry = Registry(settings.servers, self.store, self.keyring)
        self.connector = Connector(settings, self.keyring, self.registry, self.tokens)
        # Token changes made on any replica reach this one's token memory and waiters.
        self.registry.listeners.append(self.connector.lifecycle.on_event)
        self.management = Management(self.registry, self.tokens, UpstreamPolicy.from_settings(settings))
        self.forwarder = Forwarder(settings, self.registry, self.connector)
        self.web = Starlette(
            routes=[
                Route("/", self.index),
                Route("/ping", self.ping),
                Route("/ready", self.ready),
                *([] if settings.metrics_listen else [Route("/metrics", self.metrics)]),
                *admin.routes(settings.admin_token, lambda: self.management),
                *flow.routes(self.connector),
            ],
            exception_handlers={HTTPException: self.http_error},
            lifespan=self.lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _first_segment(scope["path"]) not in _OWN:
            await self.forwarder(scope, receive, send)
        else:
            await self.web(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(logs.flush)
            await self.store.open()
            stack.push_async_callback(self.store.close)
            if self.tokens is not self.store:
                await self.tokens.open()
                stack.push_async_callback(self.tokens.close)
            if self.settings.migrate_on_start or self.settings.database_url.startswith("sqlite:"):
                await self.store.migrate()
            await self.registry.start(
                poll_interval=1.0 if self.settings.database_url.startswith("sqlite:") else 5.0,
                events=self.tokens.events(),
            )
            stack.push_async_callback(self.registry.stop)
            await self.connector.start()
            stack.push_async_callback(self.connector.close)
            stack.callback(self.forwarder.stop)
            stack.callback(self._drain_on_signals())
            log.info("started", listen=self.settings.listen, servers=sorted(self.registry.servers))
            yield

    def _drain_on_signals(self) -> Callable[[], None]:
        """End open event streams as soon as SIGTERM arrives. uvicorn stops
        accepting and waits for open requests; an event stream never ends by
        itself, so without this every shutdown would wait the full timeout."""
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(sig: int, frame: Any) -> None:
            loop.call_soon_threadsafe(self.forwarder.drain)
            chained = previous[signal.Signals(sig)]
            if callable(chained):
                chained(sig, frame)

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    async def index(self, _: Request) -> Response:
        return PlainTextResponse("Keybearer: point MCP clients at /<user>/<server>.\n")

    async def ping(self, _: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(self, _: Request) -> Response:
        problems = {}
        for name, store in (("database", self.store), ("tokens", self.tokens)):
            try:
                await store.ping()
            except StoreUnavailable as exc:
                problems[name] = str(exc)
        if problems:
            return JSONResponse({"ready": False, **problems}, status_code=503)
        return JSONResponse({"ready": True})

    async def metrics(self, _: Request) -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    async def http_error(self, _: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "no such page on this proxy" if exc.status_code == 404 else exc.detail
        return JSONResponse({"error": "not_found" if exc.status_code == 404 else "http_error", "message": message},
                            status_code=exc.status_code)  # fmt: skip


_OWN = routing.RESERVED | {""}


def check_exposure(settings: Settings) -> None:
    """Refuse to serve every user's credentials to the network without inbound auth."""
    if settings.listens_on_loopback or settings.inbound_auth != "none":
        return
    if not settings.allow_unauthenticated_listen:
        raise ConfigError(
            "listen",
            f"{settings.listen} is reachable beyond this machine and inbound_auth is none, so anyone who "
            "can connect could act as any user. Set inbound_auth (tokens or jwt), listen on 127.0.0.1, "
            "or, if a network policy or an authenticating proxy in front protects it, set "
            "KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN=true",
        )
    log.warning(
        "LISTENING WITHOUT INBOUND AUTHENTICATION beyond loopback: any caller that can reach "
        f"{settings.listen} can act as any user; make sure something in front restricts it",
        listen=settings.listen,
    )


def from_environment() -> Keybearer:
    """The app factory each worker process calls (workers > 1)."""
    settings = load_settings()
    logs.configure(settings.log_level, flush_interval=logs.SERVER_FLUSH_INTERVAL)
    return Keybearer(settings)


def _first_segment(path: str) -> str:
    first = path[1:].split("/", 1)[0]
    # Dot-prefixed names (.well-known) are never users: answer them with a
    # plain 404 rather than a path error.
    return "well-known" if first.startswith(".") else first.lower()
