"""A refresh storm: many users whose tokens expired at once, each asked for on two
replicas (two token lifecycles on one real Redis, each with its own client, event
subscription and fetcher), against an authorization server whose token endpoint takes
50 ms and rotates refresh tokens (a second use of one is counted as reuse).

`make bench` runs the full-size storm (1,000 users, 3 replicas); before each replica
bounded its refreshes in flight, every one of them took a lock at once and then queued
for connections and CPU while holding it, and the other replicas' waiters gave up (503).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from services import REDIS_URL

from proxy.connect.lifecycle import (
    REFRESHES_AT_ONCE,
    BeforeCall,
    Refresher,
    TokenLifecycle,
    TokenSet,
    seal,
)
from proxy.crypto import Keyring
from proxy.events import ChangeFeed
from proxy.names import parse_event
from proxy.oauth import client as oauth_client
from proxy.oauth.client import TokenResponse
from proxy.oauth.discovery import AuthServer
from proxy.oauth.fetch import Fetcher
from proxy.settings import ServerConfig
from proxy.stores import Connection
from proxy.stores.redis import RedisTokenStore

USERS = 200
TOKEN_DELAY = 0.05


@dataclass
class TokenEndpoint:
    url: str = ""
    per_user: Counter[str] = field(default_factory=Counter)
    reused: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    refresh: dict[str, str] = field(default_factory=dict)  # user -> their current refresh token
    issued: dict[str, str] = field(default_factory=dict)  # user -> the last access token issued


@pytest.fixture
async def endpoint() -> AsyncIterator[TokenEndpoint]:
    state = TokenEndpoint()

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        presented = str(form["refresh_token"])
        user = presented.partition(":")[0]
        state.per_user[user] += 1
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        try:
            await asyncio.sleep(TOKEN_DELAY)
        finally:
            state.in_flight -= 1
        if presented != state.refresh.get(user, f"{user}:seed"):
            state.reused += 1
            return web.json_response({"error": "invalid_grant"}, status=400)
        state.refresh[user] = f"{user}:{secrets.token_urlsafe(8)}"
        state.issued[user] = f"at-{user}-{secrets.token_urlsafe(8)}"
        return web.json_response({
            "access_token": state.issued[user], "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": state.refresh[user],
        })  # fmt: skip

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/token"
    yield state
    await runner.cleanup()


async def test_a_storm_over_two_replicas_refreshes_each_user_once_and_answers_every_request(
    endpoint: TokenEndpoint, redis_prefix: str, salt: str
) -> None:
    keyring = Keyring(salt)
    server = ServerConfig(id="storm", url="http://127.0.0.1:9/mcp", auth="oauth")
    issuer = endpoint.url.removesuffix("/token")
    auth_server = AuthServer(issuer, f"{issuer}/authorize", endpoint.url)
    client = oauth_client.static_registration(auth_server, "storm-client", None, "http://127.0.0.1:9/cb")
    prefix = f"{redis_prefix}-storm-{secrets.token_hex(4)}"
    stores = [RedisTokenStore.from_url(REDIS_URL, prefix=prefix) for _ in range(2)]
    fetchers = [Fetcher(allow_http_loopback=True, allow_private=False) for _ in range(2)]
    subscribed: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]

    def refresher(fetcher: Fetcher) -> Refresher:
        async def refresh(
            _: ServerConfig, __: Connection, token: str, before_call: BeforeCall
        ) -> TokenResponse:
            await before_call()
            return await oauth_client.refresh(fetcher, auth_server, client, token, None)

        return refresh

    async def follow(store: RedisTokenStore, lifecycle: TokenLifecycle, ready: asyncio.Event) -> None:
        async for text in store.events():
            ready.set()
            event = parse_event(text)
            if event is not None:
                lifecycle.on_event(event)

    for store, fetcher in zip(stores, fetchers, strict=True):
        await store.open()
        await fetcher.start()
    replicas = [
        TokenLifecycle(keyring, store, ChangeFeed(store, store), refresher(fetcher), 60.0)  # type: ignore[arg-type]
        for store, fetcher in zip(stores, fetchers, strict=True)
    ]
    followers = [
        asyncio.create_task(follow(store, lifecycle, ready))
        for store, lifecycle, ready in zip(stores, replicas, subscribed, strict=True)
    ]
    users = [f"u{i}" for i in range(USERS)]
    try:
        while not all(ready.is_set() for ready in subscribed):
            await stores[0].publish("hello")
            await asyncio.sleep(0.02)
        for user in users:
            sealed = seal(keyring, user, server.id, TokenSet("expired", f"{user}:seed"))
            await stores[0].put_connection(Connection(
                user=user, server=server.id, sealed=sealed, issuer=issuer, client_id="storm-client",
                scopes=(), expires_at=time.time() - 60, obtained_at=time.time() - 3660, version=1,
            ))  # fmt: skip
        # Every user on both replicas, all at once.
        asked = [(replica, user) for user in users for replica in replicas]
        answers = await asyncio.gather(
            *(replica.access_token(server, user) for replica, user in asked), return_exceptions=True
        )
    finally:
        for task in followers:
            task.cancel()
        for store, fetcher in zip(stores, fetchers, strict=True):
            await fetcher.close()
            await store.close()

    refused = Counter(f"{type(a).__name__}: {a}" for a in answers if isinstance(a, BaseException))
    assert not refused, refused
    assert [
        answer for answer, (_, user) in zip(answers, asked, strict=True) if answer != endpoint.issued[user]
    ] == []
    assert set(endpoint.per_user) == set(users)
    assert max(endpoint.per_user.values()) == 1
    assert endpoint.reused == 0
    # Each replica calls at most REFRESHES_AT_ONCE at a time; the rest wait their turn
    # holding no lock (before, up to the fetcher's 64 connections each, the rest queued).
    assert endpoint.most_in_flight <= 2 * REFRESHES_AT_ONCE
