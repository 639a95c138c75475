"""One call per key at a time in this process; callers arriving meanwhile share its result.

What keeps a storm of requests for one person's expired tokens (or one ID token
due for renewal) to one call: across replicas a lock in the token store does the
same, and only the caller that started the call takes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        running = self._running.get(key)
        if running is not None:
            # Shielded: a caller that gives up does not end the call for the others.
            return await asyncio.shield(running)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await call()
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters see it; no "never retrieved" warning
            raise
        finally:
            del self._running[key]
