"""The ASGI application: the proxy's own routes, and everything else forwarded.

Requests whose first path segment is one of the proxy's reserved names go to
a small Starlette app (health, later admin and browser pages); all others go
straight to the forwarder, without a router in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy import admin, routing
from proxy.crypto import Keyring
from proxy.forwarding import Forwarder
from proxy.management import Management
from proxy.oauth import flow
from proxy.oauth.connector import Connector
from proxy.registry import Registry
from proxy.settings import Settings
from proxy.stores import StoreUnavailable, open_store, open_token_store

log = structlog.get_logger("keybearer")


class Keybearer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring = Keyring(settings.salt or "", settings.salt_previous)
        self.store = open_store(settings)
        self.tokens = open_token_store(settings, self.store)
        self.registry = Registry(settings.servers, self.store, self.keyring)
        self.connector = Connector(settings, self.keyring, self.registry, self.tokens)
        self.management = Management(self.registry, self.tokens)
        self.forwarder = Forwarder(settings, self.registry, self.connector)
        self.web = Starlette(
            routes=[
                Route("/", self.index),
                Route("/ping", self.ping),
                Route("/ready", self.ready),
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
            await self.forwarder.start()
            stack.push_async_callback(self.forwarder.stop)
            log.info("started", listen=self.settings.listen, servers=sorted(self.registry.servers))
            yield

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

    async def http_error(self, _: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "no such page on this proxy" if exc.status_code == 404 else exc.detail
        return JSONResponse({"error": "not_found" if exc.status_code == 404 else "http_error", "message": message},
                            status_code=exc.status_code)  # fmt: skip


_OWN = routing.RESERVED | {""}


def _first_segment(path: str) -> str:
    first = path[1:].split("/", 1)[0]
    # Dot-prefixed names (.well-known) are never users: answer them with a
    # plain 404 rather than a path error.
    return "well-known" if first.startswith(".") else first.lower()
