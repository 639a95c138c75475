"""Tokens as identity providers issue them: lifetimes shorter than `refresh_skew`,
and connections made with a client that is no longer the current registration.
Three replicas on shared PostgreSQL and Redis, oidc-provider rotating refresh
tokens with reuse detection, the default `refresh_skew` (60 s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import AuthorizationServer, run_authorization_server
from playwright.async_api import Browser
from services import REDIS_URL
from support import ProxyProcess, free_port, start_all, stop_all
from test_token_lifecycle import SERVER, call, connect, connect_short, wait_expired

from proxy.stores.redis import RedisTokenStore

pytestmark = pytest.mark.slow
TTL = 4


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthorizationServer]:
    with run_authorization_server(access_token_ttl=TTL) as server:
        yield server


@pytest.fixture(scope="module")
def resource(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(auth.issuer) as server:
        yield server


def start_replicas(
    config: dict[str, Any], ports: list[int], salt: str, tmp: pytest.TempPathFactory
) -> list[ProxyProcess]:
    return start_all(
        [
            ProxyProcess(
                config, tmp.mktemp(f"replica-{port}"), {"KEYBEARER_SALT": salt}, port=port, start=False
            )
            for port in ports
        ]
    )


@pytest.fixture
def setup(
    resource: ResourceServer,
    postgres_database: str,
    redis_prefix: str,
    salt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, Any], list[int], list[list[ProxyProcess]]]]:
    ports = [free_port() for _ in range(3)]
    config: dict[str, Any] = {
        "public_url": f"http://127.0.0.1:{ports[0]}",
        "database_url": postgres_database,
        "redis_url": REDIS_URL,
        "redis_prefix": f"{redis_prefix}-lt-{ports[0]}",
        "migrate_on_start": True,
        "oauth_allow_http_loopback": True,
        "servers": {SERVER: {"url": resource.mcp_url, "auth": "oauth"}},
    }
    started: list[list[ProxyProcess]] = [start_replicas(config, ports, salt, tmp_path_factory)]
    yield config, ports, started
    for replicas in started:
        stop_all(replicas)


async def test_short_lived_tokens_are_refreshed_about_once_per_lifetime(
    setup: tuple[dict[str, Any], list[int], list[list[ProxyProcess]]],
    browser: Browser,
    auth: AuthorizationServer,
) -> None:
    replicas = setup[2][0]
    await connect(replicas, browser, "carol")
    auth.reset_stats()
    requests, spread = 16, 2.0 * TTL  # two lifetimes
    started_at = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(requests):
            # A burst on every replica at once, then a pause.
            answers = await asyncio.gather(*(call(replicas[j], "carol", client) for j in range(3)))
            assert all(a.status_code == 200 and '"result"' in a.text for a in answers), [
                a.text[:200] for a in answers
            ]
            await asyncio.sleep(spread / requests)
    elapsed = time.monotonic() - started_at
    stats = auth.stats()
    refreshes = stats["token_requests"].get("refresh_token", 0)
    # Due a quarter of a lifetime before expiry: about once per 3 s, never per request.
    assert 2 <= refreshes <= elapsed / (TTL * 0.75) + 2, (elapsed, stats["token_requests"])
    assert stats["refresh_reuse_detected"] == 0


async def test_a_refresh_uses_the_client_the_tokens_were_issued_to(
    setup: tuple[dict[str, Any], list[int], list[list[ProxyProcess]]],
    browser: Browser,
    auth: AuthorizationServer,
    salt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config, ports, started = setup
    # Its first token expires while the replicas restart: no need to wait out TTL after.
    await connect_short(started[0], browser, auth, "dave", TTL)
    stop_all(started[0])
    # A new public_url: a new redirect URI, so a new dynamic registration for new sign-ins.
    moved = {**config, "public_url": f"http://localhost:{ports[0]}"}
    started.append(start_replicas(moved, ports, salt, tmp_path_factory))
    replicas = started[-1]
    tokens = RedisTokenStore.from_url(REDIS_URL, prefix=config["redis_prefix"])
    await tokens.open()
    try:
        before = await wait_expired(tokens, "dave")
        auth.reset_stats()
        async with httpx.AsyncClient(timeout=30) as client:
            answers = await asyncio.gather(*(call(replicas[i % 3], "dave", client) for i in range(9)))
        assert all(a.status_code == 200 and '"result"' in a.text for a in answers), answers[0].text[:300]
        stats = auth.stats()
        assert stats["token_requests"].get("refresh_token") == 1, stats["token_requests"]
        assert stats["token_errors"] == {}, stats["token_errors"]
        refreshed = [t for t in stats["token_log"] if t["grant_type"] == "refresh_token"]
        assert refreshed[0]["client_id"] == before.client_id
        # New sign-ins use the registration for the new redirect URI.
        await connect(replicas, browser, "erin")
        erin = await tokens.get_connection("erin", SERVER)
        assert erin is not None and erin.client_id != before.client_id
    finally:
        await tokens.close()
