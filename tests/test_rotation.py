"""Key rotation under traffic: two replicas on PostgreSQL and Redis move from
salt A to salt B while MCP clients keep calling through them, with
`keybearer keys rotate` re-sealing every secret and token in between."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from peers.mcp_client import Upstream, result_text, run_upstream, streamable_session
from services import REDIS_URL
from support import ProxyProcess, start_all, stop_all

from proxy.connect.lifecycle import TokenSet, seal, unseal
from proxy.crypto import Keyring
from proxy.stores import Connection
from proxy.stores.postgres import PostgresStore
from proxy.stores.redis import RedisTokenStore

ADMIN_TOKEN = "rotation-admin-token-6c2e0f4a8b"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = {f"keyed{i}": f"sk-rotation-{i}-{secrets.token_hex(8)}" for i in range(3)}
CLIENT_SECRET = "cs-rotation-0f1e2d3c4b5a69788796"
OAUTH = "notes"
USERS = [f"user{i}" for i in range(12)]
REGISTRATION = f"{OAUTH}|https://as.example|http://127.0.0.1/oauth/callback"


def access_token(user: str) -> str:
    return f"at-{user}-rotation-0123456789"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


@pytest.fixture
async def database_url(postgres_database: str) -> str:
    schema = f"rotation_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(postgres_database)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    return f"{postgres_database}?search_path={schema}"


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}-rotation-{secrets.token_hex(3)}"


@pytest.fixture
async def stores(database_url: str, prefix: str) -> AsyncIterator[tuple[PostgresStore, RedisTokenStore]]:
    store = PostgresStore(database_url, pool_size=2)
    tokens = RedisTokenStore.from_url(REDIS_URL, prefix=prefix)
    await store.open()
    await tokens.open()
    yield store, tokens
    await tokens.close()
    await store.close()


@pytest.fixture
def replicas(database_url: str, prefix: str, tmp_path: Path) -> Iterator[list[ProxyProcess]]:
    config = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "migrate_on_start": True,
        "admin_token": ADMIN_TOKEN,
        # The upstream the servers added at run time point at listens on loopback.
        "api_servers_allowed_networks": ["127.0.0.0/8"],
    }
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
    procs = [ProxyProcess(config, tmp_path / f"r{i}", {}, start=False) for i in range(2)]
    yield procs
    stop_all(procs)


def restart(replicas: list[ProxyProcess], salt: str, previous: str | None) -> None:
    """Every replica with the new salt settings, all at once."""
    stop_all(replicas)
    for proc in replicas:
        proc.env = {k: v for k, v in proc.env.items() if not k.startswith(("KEYBEARER_SALT", "SALT"))}
        proc.env["KEYBEARER_SALT"] = salt
        if previous:
            proc.env["KEYBEARER_SALT_PREVIOUS"] = previous
    start_all(replicas)


async def seed(replica: ProxyProcess, upstream: Upstream, tokens: RedisTokenStore, keyring_a: Keyring,
               store: PostgresStore) -> None:  # fmt: skip
    """Something of every kind, sealed with salt A: through the admin API where it
    can be, and the way the connect flow writes them for OAuth connections."""
    async with httpx.AsyncClient(base_url=replica.url, headers=ADMIN, timeout=10) as admin:
        for sid, key in KEYS.items():
            created = await admin.post(
                "/admin/servers", json={"id": sid, "url": upstream.mcp_url, "auth": "api_key"}
            )
            assert created.status_code == 201, created.text
            assert (
                await admin.put(f"/admin/servers/{sid}/api-key", json={"api_key": key})
            ).status_code == 204
        # An OAuth server whose "upstream" is the SDK test server: the stored
        # access token is sent as is and shows in its `headers` tool.
        created = await admin.post(
            "/admin/servers", json={"id": OAUTH, "url": upstream.mcp_url, "auth": "oauth"}
        )
        assert created.status_code == 201
        client = await admin.put(
            f"/admin/servers/{OAUTH}/oauth-client",
            json={"client_id": "static", "client_secret": CLIENT_SECRET},
        )
        assert client.status_code == 200, client.text
        for label in ("ci", "ops"):
            assert (
                await admin.post("/admin/tokens", json={"users": USERS[:2], "label": label})
            ).status_code == 201
    registration = json.dumps({"client_id": "dcr-client", "client_secret": "dcr-secret-00112233"})
    await store.set_secret("client_registration", REGISTRATION, keyring_a.encrypt(
        "client_registration", registration.encode(), f"client_registration:{REGISTRATION}"))  # fmt: skip
    now = time.time()
    for user in USERS:
        sealed = seal(keyring_a, user, OAUTH, TokenSet(access_token(user), f"rt-{user}-rotation-987654"))
        conn = Connection(user=user, server=OAUTH, sealed=sealed, issuer="https://as.example",
                          client_id="static", expires_at=now + 3600, obtained_at=now, version=1)  # fmt: skip
        assert await tokens.put_connection(conn, expected_version=0)
    # A user who must reconnect holds no tokens: nothing to re-seal, nothing to lose.
    gone = Connection(user="lapsed", server=OAUTH, state="must_reconnect", last_error="revoked", version=3)
    assert await tokens.put_connection(gone, expected_version=0)


async def everything(store: PostgresStore, tokens: RedisTokenStore, keyring: Keyring) -> dict[str, Any]:
    """Every stored secret and token set, opened with `keyring`."""
    opened: dict[str, Any] = {}
    for kind, name, sealed in await store.list_secrets():
        opened[f"{kind}:{name}"] = keyring.decrypt(kind, sealed, f"{kind}:{name}").decode()
    for conn in await tokens.list_connections(OAUTH):
        opened[f"oauth_token:{conn.user}"] = unseal(keyring, conn) if conn.sealed else conn.state
    return opened


async def sealing(store: PostgresStore, tokens: RedisTokenStore, keyring: Keyring) -> list[tuple[str, bool]]:
    """(record, sealed with the keyring's current salt) for every sealed value."""
    out = [(f"{k}:{n}", keyring.is_current(k, sealed)) for k, n, sealed in await store.list_secrets()]
    out += [
        (f"oauth_token:{c.user}", keyring.is_current("oauth_token", c.sealed))
        for c in await tokens.list_connections(OAUTH)
        if c.sealed is not None
    ]
    return sorted(out)


class Traffic:
    """MCP clients calling through every replica, each call checked, until stopped."""

    def __init__(self, replicas: list[ProxyProcess]) -> None:
        self.targets = [
            (r, sid, "alice", f"Bearer {key}") for r in replicas for sid, key in list(KEYS.items())[:1]
        ]
        self.targets += [
            (r, OAUTH, user, f"Bearer {access_token(user)}") for r in replicas for user in USERS[:2]
        ]
        self.calls = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self, replica: ProxyProcess, server: str, user: str, expected: str) -> None:
        while not self._stop.is_set():
            try:
                async with streamable_session(f"{replica.url}/{user}/{server}") as session:
                    for _ in range(25):
                        seen = json.loads(result_text(await session.call_tool("headers", {})))
                        self.calls += 1
                        if seen.get("authorization") != expected:
                            self.failures.append(f"{server}/{user}: wrong credential")
                        if self._stop.is_set():
                            return
            except Exception as exc:
                self.failures.append(f"{server}/{user}: {type(exc).__name__}: {exc}")

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._run(*t)) for t in self.targets]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)

    async def wait_calls(self, more: int) -> None:
        target = self.calls + more
        async with asyncio.timeout(10):
            while self.calls < target:
                await asyncio.sleep(0.01)


def rotate(replica: ProxyProcess) -> dict[str, Any]:
    result = replica.cli("keys", "rotate", "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def check_forwarding(replicas: list[ProxyProcess]) -> None:
    for replica in replicas:
        for sid, key in KEYS.items():
            async with streamable_session(f"{replica.url}/alice/{sid}") as session:
                seen = json.loads(result_text(await session.call_tool("headers", {})))
            assert seen["authorization"] == f"Bearer {key}"
        for user in (USERS[0], USERS[-1]):
            async with streamable_session(f"{replica.url}/{user}/{OAUTH}") as session:
                seen = json.loads(result_text(await session.call_tool("headers", {})))
            assert seen["authorization"] == f"Bearer {access_token(user)}"


async def test_rotation_under_traffic(
    replicas: list[ProxyProcess],
    upstream: Upstream,
    stores: tuple[PostgresStore, RedisTokenStore],
) -> None:
    store, tokens = stores
    salt_a, salt_b = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    keyring_a, keyring_b = Keyring(salt_a), Keyring(salt_b, [salt_a])
    only_b = Keyring(salt_b)

    restart(replicas, salt_a, None)
    await seed(replicas[0], upstream, tokens, keyring_a, store)
    before = await everything(store, tokens, keyring_a)
    # 3 API keys, a static client, a registration, 2 caller tokens; 12 token sets and a lapsed user
    assert len(before) == 3 + 1 + 1 + 2 + len(USERS) + 1
    sealed_before = await sealing(store, tokens, keyring_a)
    assert sealed_before and all(current for _, current in sealed_before)

    # Every replica learns the new salt and keeps the old one for reading.
    restart(replicas, salt_b, salt_a)
    await check_forwarding(replicas)

    async with Traffic(replicas) as traffic:
        await traffic.wait_calls(50)
        report = await asyncio.to_thread(rotate, replicas[0])
        during = traffic.calls
        # An announced change makes every replica reload now, re-sealed values included.
        async with httpx.AsyncClient(base_url=replicas[1].url, headers=ADMIN, timeout=10) as admin:
            answer = await admin.post("/admin/servers", json={"id": "after", "url": upstream.mcp_url})
            assert answer.status_code == 201
        await traffic.wait_calls(100)
    assert traffic.failures == [], traffic.failures[:5]
    assert during >= 50 and traffic.calls >= 150

    assert report["failed"] == [] and report["changed_meanwhile"] == 0
    assert report["secrets_resealed"] == 3 + 1 + 1 + 2
    assert report["tokens_resealed"] == len(USERS)
    assert report["already_current"] == 1  # the lapsed user's empty connection

    # Everything is sealed with B now, and nothing was lost or altered.
    assert [name for name, current in await sealing(store, tokens, only_b) if not current] == []
    assert [name for name, _ in await sealing(store, tokens, only_b)] == [name for name, _ in sealed_before]
    assert await everything(store, tokens, only_b) == before
    assert await everything(store, tokens, keyring_b) == before

    # Resumable: a second run finds everything current.
    again = await asyncio.to_thread(rotate, replicas[0])
    assert again == {
        "secrets_resealed": 0,
        "tokens_resealed": 0,
        "already_current": len(before),
        "changed_meanwhile": 0,
        "failed": [],
    }

    # Drop A: everything still opens, forwarding works, the admin API shows it all.
    restart(replicas, salt_b, None)
    await check_forwarding(replicas)
    async with httpx.AsyncClient(base_url=replicas[1].url, headers=ADMIN, timeout=10) as admin:
        for sid in KEYS:
            assert (await admin.get(f"/admin/servers/{sid}/api-key")).json()["set"] is True
        assert (await admin.get(f"/admin/servers/{OAUTH}/oauth-client")).json()["client_secret_set"] is True
        assert len((await admin.get("/admin/tokens")).json()["tokens"]) == 2
        rows = (await admin.get(f"/admin/servers/{OAUTH}/connections")).json()["connections"]
        assert len(rows) == len(USERS) + 1
    for proc in replicas:
        log = proc.log()
        for secret in (salt_a, salt_b, CLIENT_SECRET, *KEYS.values(), access_token(USERS[0])):
            assert secret not in log


async def test_rotation_without_the_old_salt_fails_and_changes_nothing(
    replicas: list[ProxyProcess],
    upstream: Upstream,
    stores: tuple[PostgresStore, RedisTokenStore],
) -> None:
    """Forgetting KEYBEARER_SALT_PREVIOUS: rotate says what it could not open, exits 1,
    and leaves every value as it was, so that it can be re-run with the old salt."""
    store, tokens = stores
    salt_a, salt_b = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    restart(replicas[:1], salt_a, None)
    await seed(replicas[0], upstream, tokens, Keyring(salt_a), store)
    sealed_before = [(k, n, s) for k, n, s in await store.list_secrets()]
    tokens_before = await tokens.list_connections(OAUTH)

    replicas[0].env["KEYBEARER_SALT"] = salt_b
    result = replicas[0].cli("keys", "rotate", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["secrets_resealed"] == 0 and report["tokens_resealed"] == 0
    assert len(report["failed"]) == 3 + 1 + 1 + 2 + len(USERS)
    assert "api_key:keyed0" in report["failed"]
    assert await store.list_secrets() == sealed_before
    assert await tokens.list_connections(OAUTH) == tokens_before

    replicas[0].env["KEYBEARER_SALT_PREVIOUS"] = salt_a
    report = rotate(replicas[0])
    assert report["failed"] == [] and report["secrets_resealed"] == 7
    assert report["tokens_resealed"] == len(USERS)
