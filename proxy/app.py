"""The composition root: every long-lived object is built and wired here.

    settings -> keyring, stores -> sealed secrets, registry, change feed
    environment -> egress proxies (for the fetcher and the forwarder)
             -> OAuth fetcher -> inbound auth
             -> OAuth clients -> token lifecycle (refresher: the clients) -> connect flow
                             -> service tokens (client_credentials; obtain: the clients)
             -> the sign-in (login.py) when login_* is set
                             -> assertion tokens (identity_assertion; obtain: sign-in + clients)
             -> one credential source per auth type (and grant) -> forwarder
             -> links, sessions
             -> management (admin API, console, CLI), browser routes

Requests whose first path segment is one of the proxy's reserved names go to
a small Starlette app (health, admin API, browser pages); all others go
straight to the forwarder, without a router in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy import admin, console, egress, errors, login, logs, metrics, routing, tracing
from proxy.connect import routes as connect_routes
from proxy.connect.assertion import AssertionTokens, IdentityAssertions
from proxy.connect.clients import OAuthClients
from proxy.connect.flow import ConnectFlow
from proxy.connect.lifecycle import TokenLifecycle
from proxy.connect.service import ServiceTokens
from proxy.connect.subject import SubjectTokens
from proxy.credentials import CredentialSource
from proxy.credentials.api_key import ApiKeys
from proxy.credentials.client_credentials import ClientCredentials
from proxy.credentials.identity_assertion import IdentityAssertion
from proxy.credentials.none import NoCredential
from proxy.credentials.oauth import OAuthTokens
from proxy.crypto import Keyring
from proxy.errors import Answer
from proxy.events import ChangeFeed
from proxy.forwarding import Agent, Forwarder
from proxy.inbound import InboundAuth
from proxy.links import CONSOLE_PATH, Links
from proxy.login import RelyingParty, Sessions
from proxy.management import Management
from proxy.oauth.fetch import Fetcher
from proxy.registry import Registry
from proxy.sealed import SealedSecrets
from proxy.settings import ConfigError, Settings, load_settings
from proxy.stores import Store, StoreUnavailable, TokenStore, open_store, open_token_store
from proxy.upstream_policy import UpstreamPolicy
from proxy.web_origin import WebOriginGuard

log = structlog.get_logger("keybearer")


@dataclass
class Components:
    """What the proxy is made of; `compose` wires it, the server and the CLI use it."""

    settings: Settings
    keyring: Keyring
    store: Store
    tokens: TokenStore
    secrets: SealedSecrets
    registry: Registry
    feed: ChangeFeed
    egress: egress.Egress | None
    fetcher: Fetcher
    inbound: InboundAuth
    clients: OAuthClients
    lifecycle: TokenLifecycle
    flow: ConnectFlow
    sources: Mapping[str, CredentialSource]
    links: Links
    sessions: Sessions
    sign_in: RelyingParty | None
    subjects: SubjectTokens | None
    management: Management
    web_origin: WebOriginGuard

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The stores open and what is cached loaded; an embedded store migrates itself."""
        async with contextlib.AsyncExitStack() as stack:
            await self.store.open()
            stack.push_async_callback(self.store.close)
            if self.tokens is not self.store:
                await self.tokens.open()
                stack.push_async_callback(self.tokens.close)
            if self.settings.migrate_on_start or self.store.embedded:
                await self.store.migrate()
            await self.registry.load()
            await self.inbound.load()
            await self.clients.load()
            yield


def compose(settings: Settings) -> Components:
    keyring = Keyring(settings.salt or "", settings.salt_previous)
    store = open_store(settings)
    tokens = open_token_store(settings, store)
    secrets = SealedSecrets(store, keyring)
    registry = Registry(settings.servers, store, secrets)
    feed = ChangeFeed(store, tokens)
    proxies = egress.from_environ(os.environ)
    fetcher = Fetcher(
        settings.oauth_allow_http_loopback, settings.oauth_allow_private_addresses, egress=proxies
    )
    inbound = InboundAuth(settings, secrets, fetcher)
    clients = OAuthClients(settings, registry, secrets, tokens, fetcher, feed)
    lifecycle = TokenLifecycle(
        keyring, tokens, feed, clients.refresh, settings.refresh_skew, settings.refresh_lock_ttl,
        settings.token_endpoint_cooldown,
    )  # fmt: skip
    flow = ConnectFlow(keyring, registry, tokens, clients, lifecycle)
    service = ServiceTokens(
        keyring, tokens, feed, lambda server, _: clients.client_credentials(server), clients.service_client_id,
        settings.refresh_skew, settings.refresh_lock_ttl, settings.token_endpoint_cooldown,
    )  # fmt: skip
    sign_in = (
        RelyingParty(settings, keyring, tokens, fetcher, lambda: _any_identity_assertion(registry))
        if settings.signs_in
        else None
    )
    subjects = (
        SubjectTokens(
            sign_in,
            keyring,
            tokens,
            settings.refresh_skew,
            settings.session_lifetime,
            settings.refresh_lock_ttl,
        )
        if sign_in
        else None
    )
    assertions = AssertionTokens(
        keyring, tokens, feed, IdentityAssertions(clients, sign_in, subjects, settings.public_url),
        clients.service_client_id,
        settings.refresh_skew, settings.refresh_lock_ttl, settings.token_endpoint_cooldown,
    )  # fmt: skip
    # Keyed by ServerConfig.credential_kind: the auth type, and for oauth the grant.
    sources: dict[str, CredentialSource] = {
        "none": NoCredential(),
        "api_key": ApiKeys(registry),
        "oauth": OAuthTokens(lifecycle, settings, keyring),
        "client_credentials": ClientCredentials(service),
        "identity_assertion": IdentityAssertion(assertions),
    }
    # Each cache hears of the changes that make it stale, on every replica.
    listeners = (
        registry.on_event, inbound.on_event, clients.on_event, lifecycle.on_event, service.on_event,
        assertions.on_event,
    )  # fmt: skip
    for listener in listeners:
        feed.subscribe(listener)
    links = Links(settings, keyring)
    sessions = Sessions(settings, keyring, tokens)
    management = Management(
        registry, store, secrets, tokens, feed, UpstreamPolicy.from_settings(settings), links
    )
    web_origin = WebOriginGuard(settings.public_url, settings.allowed_origins, settings.allowed_hosts)
    return Components(
        settings, keyring, store, tokens, secrets, registry, feed, proxies, fetcher, inbound, clients,
        lifecycle, flow, sources, links, sessions, sign_in, subjects, management, web_origin,
    )  # fmt: skip


def _any_identity_assertion(registry: Registry) -> bool:
    return any(s.credential_kind == "identity_assertion" for s in registry.servers.values())


class Keybearer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.parts = compose(settings)
        parts = self.parts
        # Here, so that a missing SDK stops `serve` before it listens, like any bad setting.
        self.traced = tracing.configure(os.environ, trace_user_ids=settings.trace_user_ids)
        self.forwarder = Forwarder(
            settings, parts.registry, parts.inbound, parts.sources, parts.web_origin, parts.egress
        )
        self.web = Starlette(
            routes=[
                Route("/ping", self.ping),
                Route("/ready", self.ready),
                *([] if settings.metrics_listen else [Route("/metrics", self.metrics)]),
                # Before the admin API's catch-all under /admin/.
                *console.routes(
                    console.Console(parts.keyring, parts.sessions, lambda: self.parts.management)
                ),
                *admin.routes(settings.admin_token, lambda: self.parts.management),
                *login.routes(login.LoginPages(parts.sessions, parts.sign_in, parts.subjects)),
                *connect_routes.routes(
                    settings, parts.keyring, parts.flow, parts.sessions, parts.links, parts.subjects
                ),
            ],
            exception_handlers={HTTPException: self.http_error},
            lifespan=self.lifespan,
        )

    def forward_now(self, scope: Scope, body: bytes, agent: Agent) -> bool:
        """The forwarder's lane, for a POST serving.py holds whole: False for anything
        else, which then comes to __call__ as usual."""
        if self.traced or _first_segment(scope["path"]) in _OWN:
            return False  # spans are made the ASGI way; the app's own paths are not forwarded
        return self.forwarder.forward_now(scope, body, agent)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.web(scope, receive, send)
        first = _first_segment(scope["path"])
        if first not in _OWN:
            return await self.forwarder(scope, receive, send)
        path = scope["path"]
        if first in _BROWSER or path == self.settings.callback_path or path.startswith(CONSOLE_PATH):
            # People's pages, too, answer only to names a rebinding page cannot take.
            refusal = self.parts.web_origin.refusal(scope["headers"], origin=False)
            if refusal is not None:
                return await errors.page_response(refusal)(scope, receive, send)
        await self.web(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        parts = self.parts
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(logs.flush)
            if self.traced:
                stack.push_async_callback(_stop_tracing)
            await stack.enter_async_context(parts.opened())
            await parts.feed.start()
            stack.push_async_callback(parts.feed.stop)
            await parts.fetcher.start()
            stack.push_async_callback(parts.fetcher.close)
            stack.callback(self.forwarder.stop)
            stack.callback(self._drain_on_signals())
            log.info(
                "started",
                listen=self.settings.listen,
                servers=sorted(parts.registry.servers),
                egress=str(parts.egress or "direct"),
            )
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

    async def ping(self, _: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(self, _: Request) -> Response:
        # Both at once, each within store_timeout: the answer comes before the probe gives up.
        stores: dict[str, Store | TokenStore] = {"database": self.parts.store, "tokens": self.parts.tokens}
        found = await asyncio.gather(*(_problem(store) for store in stores.values()))
        problems = {name: problem for name, problem in zip(stores, found, strict=True) if problem}
        for name in stores:
            metrics.store_up(name, name not in problems)
        if problems:
            return JSONResponse({"ready": False, **problems}, status_code=503)
        return JSONResponse({"ready": True})

    async def metrics(self, _: Request) -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    async def http_error(self, _: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return errors.json_response(Answer(404, "not_found", "no such page on this proxy"))
        return errors.json_response(Answer(exc.status_code, "http_error", str(exc.detail)))


async def _problem(store: Store | TokenStore) -> str | None:
    try:
        await store.ping()
    except StoreUnavailable as exc:
        return str(exc)
    return None


_OWN = routing.RESERVED | {""}
# People's pages: `/`, sign-in, connect and connections (and the console, by its path).
_BROWSER = frozenset({"", "connect", "connections", "login", "logout"})


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


async def _stop_tracing() -> None:
    # Exporting what is buffered is a blocking HTTP call, off the event loop.
    await asyncio.to_thread(tracing.shutdown)
    tracing.reset()


def _first_segment(path: str) -> str:
    first = path[1:].split("/", 1)[0]
    # Dot-prefixed names (.well-known) are never users: answer them with a
    # plain 404 rather than a path error.
    return "well-known" if first.startswith(".") else first.lower()
