"""The admin API and its CLI twin against a real `keybearer serve` process on
the embedded SQLite store, with the MCP SDK upstream behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from peers.mcp_client import INITIALIZE, Upstream, raw_post, result_text, run_upstream, streamable_session
from support import ProxyProcess

from proxy.connect.lifecycle import TokenSet, seal
from proxy.crypto import Keyring
from proxy.stores import Connection
from proxy.stores.sqlite import SQLiteStore

TOKEN = "admin-token-3f9c1b7e5d2a4c6e8f0a1b2c"
UPSTREAM_KEY = "sk-admin-test-0a1b2c3d4e5f6789"
CLIENT_SECRET = "cs-admin-test-99887766554433221100"
FIXED = "fixed"  # a config-file server: read-only at run time
# Servers added at run time must resolve to an allowed address: OAuth servers these
# tests never reach sit on a loopback port nothing listens on.
OAUTH_URL = "https://127.0.0.1:9/mcp"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, salt: str) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(
        {
            "servers": {FIXED: {"url": upstream.mcp_url, "auth": "none"}},
            "api_servers_allowed_networks": ["127.0.0.0/8"],
        },
        tmp_path_factory.mktemp("admin"),
        {"KEYBEARER_SALT": salt, "KEYBEARER_ADMIN_TOKEN": TOKEN},
    )
    yield proc
    proc.stop()
    log = proc.log()
    for secret in (TOKEN, UPSTREAM_KEY, CLIENT_SECRET, salt):
        assert secret not in log


@pytest.fixture
async def admin(proxy: ProxyProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=proxy.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ) as client:
        yield client


@pytest.fixture
async def store(proxy: ProxyProcess) -> AsyncIterator[SQLiteStore]:
    """The proxy's own SQLite file, opened beside it: what really is stored."""
    db = SQLiteStore(proxy.config["database_url"].removeprefix("sqlite:///"))
    await db.open()
    yield db
    await db.close()


@pytest.fixture(scope="module")
def keyring(salt: str) -> Keyring:
    return Keyring(salt)


async def seed_connection(store: SQLiteStore, keyring: Keyring, user: str, server: str) -> Connection:
    """A connected user, written the way the connect flow writes one."""
    tokens = TokenSet(f"at-{user}-{server}-0123456789", f"rt-{user}-{server}-0123456789")
    conn = Connection(
        user=user, server=server, sealed=seal(keyring, user, server, tokens), issuer="https://as.example",
        client_id="client-1", scopes=("read",), expires_at=time.time() + 3600, obtained_at=time.time(),
        version=1,
    )  # fmt: skip
    assert await store.put_connection(conn, expected_version=0)
    return conn


async def seed_registration(store: SQLiteStore, keyring: Keyring, server: str) -> str:
    name = f"{server}|https://as.example|http://127.0.0.1/oauth/callback"
    record = json.dumps({"client_id": f"dcr-{server}", "client_secret": None})
    await store.set_secret(
        "client_registration",
        name,
        keyring.encrypt("client_registration", record.encode(), f"client_registration:{name}"),
    )
    return name


async def create(admin: httpx.AsyncClient, server_id: str, **definition: Any) -> dict[str, Any]:
    answer = await admin.post("/admin/servers", json={"id": server_id, **definition})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


# -- access ------------------------------------------------------------------------


async def test_admin_off_without_a_token(proxy_factory: type[ProxyProcess]) -> None:
    plain = proxy_factory({})
    async with httpx.AsyncClient(base_url=plain.url) as client:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            answer = await client.get("/admin/servers", headers=headers)
            assert answer.status_code == 404
            assert answer.json()["error"] == "admin_disabled"
            assert "KEYBEARER_ADMIN_TOKEN" in answer.json()["message"]
        answer = await client.post("/admin/servers", json={"id": "x", "url": "https://x.example/mcp"})
        assert answer.status_code == 404 and answer.json()["error"] == "admin_disabled"


async def test_missing_credential_401_wrong_credential_403(proxy: ProxyProcess) -> None:
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        missing = await client.get("/admin/servers")
        assert missing.status_code == 401
        assert missing.json()["error"] == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        for header in (f"Basic {TOKEN}", "Bearer", TOKEN):
            answer = await client.get("/admin/servers", headers={"Authorization": header})
            assert answer.status_code == 401, header
        wrong = await client.get("/admin/servers", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403
        assert wrong.json()["error"] == "forbidden"
        assert "www-authenticate" not in wrong.headers
        near = await client.get("/admin/servers", headers={"Authorization": f"Bearer {TOKEN}x"})
        assert near.status_code == 403
        ok = await client.get("/admin/servers", headers={"Authorization": f"bearer {TOKEN}"})
        assert ok.status_code == 200


# -- servers -----------------------------------------------------------------------


async def test_servers_crud(admin: httpx.AsyncClient, upstream: Upstream) -> None:
    created = await create(admin, "crud", url=upstream.mcp_url, auth="none", paths=["/health"])
    assert created["id"] == "crud" and created["source"] == "store" and created["read_only"] is False
    assert created["url"] == upstream.mcp_url and created["paths"] == ["/health"]

    got = (await admin.get("/admin/servers/crud")).json()
    assert got == created
    listed = {s["id"]: s for s in (await admin.get("/admin/servers")).json()["servers"]}
    assert listed["crud"] == created
    assert listed[FIXED]["source"] == "config" and listed[FIXED]["read_only"] is True

    updated = await admin.put(
        "/admin/servers/crud",
        json={
            "id": "crud",
            "url": upstream.base_url + "/_echo",
            "auth": "api_key",
            "api_key_header": "X-Key",
        },
    )
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert (body["url"], body["auth"], body["api_key_header"]) == (
        upstream.base_url + "/_echo",
        "api_key",
        "X-Key",
    )
    assert "paths" not in body  # PUT replaces the definition
    assert body["api_key"] == {"set": False, "source": None, "last4": None, "length": None}
    assert (await admin.get("/admin/servers/crud")).json() == body

    deleted = await admin.delete("/admin/servers/crud")
    assert deleted.status_code == 204
    gone = await admin.get("/admin/servers/crud")
    assert gone.status_code == 404 and gone.json()["error"] == "not_found"
    assert "crud" not in {s["id"] for s in (await admin.get("/admin/servers")).json()["servers"]}


async def test_created_server_is_immediately_usable(
    admin: httpx.AsyncClient, proxy: ProxyProcess, upstream: Upstream
) -> None:
    url = f"{proxy.url}/alice/fresh"
    assert (await raw_post(url, INITIALIZE)).json()["error"]["data"]["error"] == "unknown_server"
    await create(admin, "fresh", url=upstream.mcp_url, auth="none")
    async with streamable_session(url) as session:
        assert result_text(await session.call_tool("echo", {"text": "through a new server"})) == (
            "through a new server"
        )
    assert (await admin.delete("/admin/servers/fresh")).status_code == 204
    assert (await raw_post(url, INITIALIZE)).json()["error"]["data"]["error"] == "unknown_server"


# -- refused requests change nothing --------------------------------------------------


def big_body() -> bytes:
    return json.dumps(
        {"id": "big", "url": "https://x.example/mcp", "auth": "none", "pad": "x" * 100_000}
    ).encode()


async def chunked_big_body() -> AsyncIterator[bytes]:
    for _ in range(20):
        yield b"x" * 8192


REFUSED: list[tuple[str, str, str, dict[str, Any], int, str, str | None]] = [
    # (name, method, path, request kwargs, status, error, what the message must name)
    ("unknown-field", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://x.example/mcp", "auth": "none", "colour": "red"}}, 400, "invalid_request", "colour"),
    ("invalid-url", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "ftp://x.example/mcp", "auth": "none"}}, 400, "invalid_request", "url"),
    ("url-with-credentials", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://u:p@x.example/mcp", "auth": "none"}}, 400, "invalid_request", "url"),
    ("port-out-of-range", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://x.example:99999/mcp", "auth": "none"}}, 400, "invalid_request", "url"),
    ("environment-through-the-api", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": OAUTH_URL, "auth": "api_key", "api_key_env": "KEYBEARER_SALT"}}, 400, "invalid_request", "config file"),
    ("update-to-metadata-address", "PUT", "/admin/servers/base-none",
     {"json": {"url": "http://169.254.169.254/latest", "auth": "none"}}, 400, "invalid_request", "metadata"),
    ("host-not-a-host-name", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://" + "a" * 64 + ".example/mcp", "auth": "none"}}, 400, "invalid_request", "host name"),
    ("host-with-empty-label", "PUT", "/admin/servers/base-none",
     {"json": {"url": "http://127..1/mcp", "auth": "none"}}, 400, "invalid_request", "host name"),
    ("lone-surrogate-in-api-key", "PUT", "/admin/servers/base-key/api-key",
     {"content": b'{"api_key": "\\ud800-0123456789abcdef"}'}, 400, "invalid_request", "surrogate"),
    ("lone-surrogate-in-definition", "POST", "/admin/servers",
     {"content": b'{"id": "n1", "url": "https://127.0.0.1:9/mcp", "auth": "oauth", "client_id": "\\udfff"}'}, 400, "invalid_request", "surrogate"),
    ("lone-surrogate-in-token-label", "POST", "/admin/tokens",
     {"content": b'{"users": ["alice"], "label": "\\ud800"}'}, 400, "invalid_request", "surrogate"),
    ("missing-url", "POST", "/admin/servers", {"json": {"id": "n1", "auth": "none"}}, 400, "invalid_request", "url"),
    ("bad-auth", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://x.example/mcp", "auth": "magic"}}, 400, "invalid_request", "auth"),
    ("bad-id", "POST", "/admin/servers",
     {"json": {"id": "Bad Id", "url": "https://x.example/mcp", "auth": "none"}}, 400, "invalid_request", "id: must be"),
    ("id-not-a-string", "POST", "/admin/servers",
     {"json": {"id": 7, "url": "https://x.example/mcp", "auth": "none"}}, 400, "invalid_request", "id"),
    ("key-setting-without-api-key-auth", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://x.example/mcp", "auth": "none", "api_key_env": "X"}}, 400, "invalid_request", "api_key_env"),
    ("organisation-managed-without-sign-in", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": OAUTH_URL, "auth": "oauth", "grant": "identity_assertion", "client_id": "kb"}},
     400, "invalid_request", "login_issuer"),
    ("update-to-organisation-managed-without-sign-in", "PUT", "/admin/servers/base-oauth",
     {"json": {"url": OAUTH_URL, "auth": "oauth", "grant": "identity_assertion", "client_id": "kb"}},
     400, "invalid_request", "login_issuer"),
    ("duplicate", "POST", "/admin/servers",
     {"json": {"id": "base-none", "url": "https://x.example/mcp", "auth": "none"}}, 409, "conflict", "base-none"),
    ("duplicate-of-config-server", "POST", "/admin/servers",
     {"json": {"id": FIXED, "url": "https://x.example/mcp", "auth": "none"}}, 409, "conflict", "config file"),
    ("update-config-server", "PUT", f"/admin/servers/{FIXED}",
     {"json": {"url": "https://x.example/mcp", "auth": "none"}}, 409, "conflict", "read-only"),
    ("delete-config-server", "DELETE", f"/admin/servers/{FIXED}", {}, 409, "conflict", "read-only"),
    ("update-unknown-field", "PUT", "/admin/servers/base-none",
     {"json": {"url": "https://x.example/mcp", "auth": "none", "colour": "red"}}, 400, "invalid_request", "colour"),
    ("update-invalid-url", "PUT", "/admin/servers/base-none",
     {"json": {"url": "not a url", "auth": "none"}}, 400, "invalid_request", "url"),
    ("update-other-id", "PUT", "/admin/servers/base-none",
     {"json": {"id": "other", "url": "https://x.example/mcp", "auth": "none"}}, 400, "invalid_request", "id"),
    ("update-unknown-server", "PUT", "/admin/servers/nosuch",
     {"json": {"url": "https://x.example/mcp", "auth": "none"}}, 404, "not_found", "nosuch"),
    ("delete-unknown-server", "DELETE", "/admin/servers/nosuch", {}, 404, "not_found", "nosuch"),
    ("invalid-path-id", "DELETE", "/admin/servers/-dash", {}, 400, "invalid_request", "server"),
    ("huge-body", "POST", "/admin/servers", {"content": big_body()}, 413, "body_too_large", None),
    ("huge-chunked-body", "POST", "/admin/servers", {"content": "chunked"}, 413, "body_too_large", None),
    ("invalid-json", "POST", "/admin/servers", {"content": b'{"id": "n1", "url": '}, 400, "invalid_request", "JSON"),
    ("json-array", "POST", "/admin/servers", {"json": [1, 2]}, 400, "invalid_request", None),
    ("update-invalid-json", "PUT", "/admin/servers/base-none", {"content": b"nope"}, 400, "invalid_request", "JSON"),
    ("api-key-on-none-server", "PUT", "/admin/servers/base-none/api-key",
     {"json": {"api_key": "k-0123456789abcdef"}}, 400, "invalid_request", "auth"),
    ("api-key-extra-field", "PUT", "/admin/servers/base-key/api-key",
     {"json": {"api_key": "k-0123456789abcdef", "note": "x"}}, 400, "invalid_request", "api_key"),
    ("api-key-not-a-string", "PUT", "/admin/servers/base-key/api-key",
     {"json": {"api_key": 1234567890}}, 400, "invalid_request", "api_key"),
    ("api-key-two-lines", "PUT", "/admin/servers/base-key/api-key",
     {"json": {"api_key": "abc\ndef"}}, 400, "invalid_request", "API key"),
    ("api-key-empty", "PUT", "/admin/servers/base-key/api-key", {"json": {"api_key": "  "}}, 400, "invalid_request", "API key"),
    ("api-key-unknown-server", "PUT", "/admin/servers/nosuch/api-key",
     {"json": {"api_key": "k-0123456789abcdef"}}, 404, "not_found", "nosuch"),
    ("api-key-clear-none-stored", "DELETE", "/admin/servers/base-oauth/api-key", {}, 404, "not_found", None),
    ("oauth-client-on-api-key-server", "PUT", "/admin/servers/base-key/oauth-client",
     {"json": {"client_id": "c1"}}, 400, "invalid_request", "auth"),
    ("oauth-client-unknown-field", "PUT", "/admin/servers/base-oauth/oauth-client",
     {"json": {"client_id": "c1", "scope": "x"}}, 400, "invalid_request", "scope"),
    ("oauth-client-secret-missing", "PUT", "/admin/servers/base-oauth/oauth-client",
     {"json": {"client_id": "c1", "auth_method": "client_secret_basic"}}, 400, "invalid_request", "client_secret"),
    ("oauth-client-bad-method", "PUT", "/admin/servers/base-oauth/oauth-client",
     {"json": {"client_id": "c1", "client_secret": "s", "auth_method": "tls"}}, 400, "invalid_request", "auth_method"),
    ("oauth-client-no-id", "PUT", "/admin/servers/base-oauth/oauth-client", {"json": {}}, 400, "invalid_request", "client_id"),
    ("connection-unknown-user", "DELETE", "/admin/servers/base-oauth/connections/mallory", {}, 404, "not_found", "mallory"),
    ("reset-unknown-server", "POST", "/admin/servers/nosuch/reset", {}, 404, "not_found", "nosuch"),
    ("token-without-users", "POST", "/admin/tokens", {"json": {"label": "x"}}, 400, "invalid_request", "users"),
    ("token-bad-user", "POST", "/admin/tokens", {"json": {"users": ["not a user"]}}, 400, "invalid_request", "users"),
    ("token-extra-field", "POST", "/admin/tokens", {"json": {"users": ["alice"], "admin": True}}, 400, "invalid_request", "users"),
    ("token-revoke-unknown", "DELETE", "/admin/tokens/0123456789ab", {}, 404, "not_found", "0123456789ab"),
    ("token-revoke-bad-id", "DELETE", "/admin/tokens/a-b", {}, 400, "invalid_request", None),
    ("unknown-endpoint", "POST", "/admin/servers/base-none/rotate", {}, 404, "not_found", None),
    ("no-credential", "POST", "/admin/servers",
     {"json": {"id": "n1", "url": "https://x.example/mcp", "auth": "none"}, "headers": {"Authorization": ""}}, 401, "unauthorized", None),
    ("wrong-credential", "DELETE", "/admin/servers/base-none",
     {"headers": {"Authorization": "Bearer wrong"}}, 403, "forbidden", None),
    ("wrong-credential-reset", "POST", "/admin/servers/base-oauth/reset",
     {"headers": {"Authorization": "Bearer wrong"}}, 403, "forbidden", None),
]  # fmt: skip


@pytest.fixture(scope="module")
async def baseline(proxy: ProxyProcess, upstream: Upstream, keyring: Keyring) -> dict[str, Any]:
    """Something of every kind, so that a refused request has something to break."""
    async with httpx.AsyncClient(base_url=proxy.url, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
        await create(admin, "base-none", url=upstream.mcp_url, auth="none")
        await create(admin, "base-key", url=upstream.mcp_url, auth="api_key")
        await create(admin, "base-oauth", url=OAUTH_URL, auth="oauth")
        key = await admin.put("/admin/servers/base-key/api-key", json={"api_key": UPSTREAM_KEY})
        assert key.status_code == 204
        client = await admin.put(
            "/admin/servers/base-oauth/oauth-client",
            json={"client_id": "static-1", "client_secret": CLIENT_SECRET},
        )
        assert client.status_code == 200
        token = await admin.post("/admin/tokens", json={"users": ["alice"], "label": "baseline"})
        assert token.status_code == 201
    db = SQLiteStore(proxy.config["database_url"].removeprefix("sqlite:///"))
    await db.open()
    try:
        await seed_connection(db, keyring, "alice", "base-oauth")
        await seed_registration(db, keyring, "base-oauth")
        await db.cache_set("oauth:base-oauth:discovery", "{}", 3600)
    finally:
        await db.close()
    return {"token_id": token.json()["id"]}


async def snapshot(admin: httpx.AsyncClient, store: SQLiteStore) -> dict[str, Any]:
    """Everything the admin API shows, and everything the store holds, byte for byte."""
    servers = (await admin.get("/admin/servers")).json()["servers"]
    shown: dict[str, Any] = {"servers": servers, "tokens": (await admin.get("/admin/tokens")).json()}
    for s in servers:
        sid = s["id"]
        shown[f"{sid}/api-key"] = (await admin.get(f"/admin/servers/{sid}/api-key")).json()
        if s["auth"] == "oauth":
            shown[f"{sid}/oauth-client"] = (await admin.get(f"/admin/servers/{sid}/oauth-client")).json()
            shown[f"{sid}/connections"] = (await admin.get(f"/admin/servers/{sid}/connections")).json()
    stored = {
        "servers": [s.to_dict() | {"id": s.id} for s in await store.list_servers()],
        "secrets": await store.list_secrets(),
        "connections": await store.list_connections("base-oauth"),
        "cache": await store.cache_get("oauth:base-oauth:discovery"),
    }
    return {"shown": shown, "stored": stored}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error", "names"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
async def test_refused_request_changes_nothing(
    baseline: dict[str, Any],
    admin: httpx.AsyncClient,
    store: SQLiteStore,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    error: str,
    names: str | None,
) -> None:
    before = await snapshot(admin, store)
    assert "base-key" in {s["id"] for s in before["shown"]["servers"]}
    if kwargs.get("content") == "chunked":
        kwargs = {**kwargs, "content": chunked_big_body()}
    if kwargs.get("headers", {}).get("Authorization") == "":
        async with httpx.AsyncClient(base_url=admin.base_url) as anonymous:
            answer = await anonymous.request(
                method, path, **{k: v for k, v in kwargs.items() if k != "headers"}
            )
    else:
        answer = await admin.request(method, path, **kwargs)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == error
    assert body["message"]
    if names is not None:
        assert names in body["message"], body["message"]
    assert await snapshot(admin, store) == before


# -- API keys ------------------------------------------------------------------------


async def test_api_key_is_write_only_and_reaches_upstream(
    admin: httpx.AsyncClient, proxy: ProxyProcess, upstream: Upstream, store: SQLiteStore
) -> None:
    await create(admin, "keyed", url=upstream.mcp_url, auth="api_key")
    url = f"{proxy.url}/alice/keyed"
    missing = await raw_post(url, INITIALIZE)
    assert missing.status_code == 503 and missing.json()["error"]["data"]["error"] == "api_key_missing"
    assert (await admin.get("/admin/servers/keyed/api-key")).json() == {
        "set": False, "source": None, "last4": None, "length": None,
    }  # fmt: skip

    answer = await admin.put("/admin/servers/keyed/api-key", json={"api_key": UPSTREAM_KEY})
    assert answer.status_code == 204 and not answer.content
    info = (await admin.get("/admin/servers/keyed/api-key")).json()
    assert info == {"set": True, "source": "stored", "last4": UPSTREAM_KEY[-4:], "length": len(UPSTREAM_KEY)}
    for path in ("/admin/servers/keyed", "/admin/servers", "/admin/servers/keyed/api-key"):
        assert UPSTREAM_KEY not in (await admin.get(path)).text
    stored = await store.get_secret("api_key", "keyed")
    assert stored is not None and UPSTREAM_KEY not in stored

    # set through the admin API, used by the forwarder at once
    async with streamable_session(url) as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"

    cleared = await admin.delete("/admin/servers/keyed/api-key")
    assert cleared.status_code == 204
    assert (await admin.get("/admin/servers/keyed/api-key")).json()["set"] is False
    assert await store.get_secret("api_key", "keyed") is None
    assert (await raw_post(url, INITIALIZE)).status_code == 503
    again = await admin.delete("/admin/servers/keyed/api-key")
    assert again.status_code == 404
    assert (await admin.delete("/admin/servers/keyed")).status_code == 204


async def test_api_key_in_a_custom_header(
    admin: httpx.AsyncClient, proxy: ProxyProcess, upstream: Upstream
) -> None:
    await create(
        admin, "xkeyed", url=upstream.mcp_url, auth="api_key", api_key_header="X-API-Key", api_key_scheme=""
    )
    assert (
        await admin.put("/admin/servers/xkeyed/api-key", json={"api_key": UPSTREAM_KEY})
    ).status_code == 204
    async with streamable_session(f"{proxy.url}/bob/xkeyed") as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in seen
    assert (await admin.delete("/admin/servers/xkeyed")).status_code == 204


# -- static OAuth clients ------------------------------------------------------------------


async def test_static_oauth_client(admin: httpx.AsyncClient, store: SQLiteStore) -> None:
    await create(admin, "oa-client", url=OAUTH_URL, auth="oauth")
    assert (await admin.get("/admin/servers/oa-client/oauth-client")).json() == {
        "server": "oa-client",
        "set": False,
    }
    answer = await admin.put(
        "/admin/servers/oa-client/oauth-client",
        json={"client_id": "kb-static", "client_secret": CLIENT_SECRET},
    )
    assert answer.status_code == 200
    expected = {
        "server": "oa-client",
        "set": True,
        "client_id": "kb-static",
        "auth_method": "client_secret_basic",
        "client_secret_set": True,
    }
    assert answer.json() == expected
    got = await admin.get("/admin/servers/oa-client/oauth-client")
    assert got.json() == expected
    for response in (answer, got, await admin.get("/admin/servers/oa-client")):
        assert CLIENT_SECRET not in response.text
    sealed = await store.get_secret("client_secret", "oa-client")
    assert sealed is not None and CLIENT_SECRET not in sealed

    public = await admin.put(
        "/admin/servers/oa-client/oauth-client", json={"client_id": "kb-public", "auth_method": "none"}
    )
    assert public.json()["client_secret_set"] is False and public.json()["auth_method"] == "none"

    assert (await admin.delete("/admin/servers/oa-client/oauth-client")).status_code == 204
    assert (await admin.get("/admin/servers/oa-client/oauth-client")).json()["set"] is False
    assert await store.get_secret("client_secret", "oa-client") is None
    assert (await admin.delete("/admin/servers/oa-client/oauth-client")).status_code == 404
    assert (await admin.delete("/admin/servers/oa-client")).status_code == 204


# -- connections, reset, delete ------------------------------------------------------------


async def test_connections_list_and_delete(
    admin: httpx.AsyncClient, store: SQLiteStore, keyring: Keyring
) -> None:
    await create(admin, "oa-conn", url=OAUTH_URL, auth="oauth")
    assert (await admin.get("/admin/servers/oa-conn/connections")).json() == {
        "server": "oa-conn",
        "connections": [],
    }
    alice = await seed_connection(store, keyring, "alice", "oa-conn")
    await seed_connection(store, keyring, "bob", "oa-conn")
    listed = await admin.get("/admin/servers/oa-conn/connections")
    rows = listed.json()["connections"]
    assert [r["user"] for r in rows] == ["alice", "bob"]
    assert rows[0] == {
        "user": "alice",
        "server": "oa-conn",
        "state": "connected",
        "issuer": "https://as.example",
        "scopes": ["read"],
        "expires_at": alice.expires_at,
        "refreshable": True,
        "obtained_at": alice.obtained_at,
        "last_error": None,
    }
    assert "at-alice" not in listed.text and alice.sealed not in listed.text

    assert (await admin.delete("/admin/servers/oa-conn/connections/alice")).status_code == 204
    assert [c.user for c in await store.list_connections("oa-conn")] == ["bob"]
    assert await store.get_connection("alice", "oa-conn") is None
    assert (await admin.delete("/admin/servers/oa-conn/connections/alice")).status_code == 404
    assert (await admin.delete("/admin/servers/oa-conn")).status_code == 204


async def test_reset_wipes_oauth_state(
    admin: httpx.AsyncClient, store: SQLiteStore, keyring: Keyring
) -> None:
    for sid in ("oa-reset", "oa-reset-2"):
        await create(admin, sid, url=OAUTH_URL, auth="oauth")
    # (setting a static client drops registrations: it comes first)
    client = await admin.put("/admin/servers/oa-reset/oauth-client", json={"client_id": "kept"})
    assert client.status_code == 200
    for sid in ("oa-reset", "oa-reset-2"):
        await seed_connection(store, keyring, "alice", sid)
        await seed_registration(store, keyring, sid)
        await store.cache_set(f"oauth:{sid}:discovery", '{"cached": true}', 3600)
    await seed_connection(store, keyring, "bob", "oa-reset")

    answer = await admin.post("/admin/servers/oa-reset/reset")
    assert answer.status_code == 200
    assert answer.json() == {
        "server": "oa-reset",
        "deleted": {"connections": 2, "registrations": 1, "cache_entries": 1},
    }
    assert await store.list_connections("oa-reset") == []
    assert await store.cache_get("oauth:oa-reset:discovery") is None
    kinds = {(k, n.split("|")[0]) for k, n, _ in await store.list_secrets()}
    assert ("client_registration", "oa-reset") not in kinds
    # the static client is configuration, not state: it stays
    assert ("client_secret", "oa-reset") in kinds
    # the neighbour keeps everything
    assert ("client_registration", "oa-reset-2") in kinds
    assert [c.user for c in await store.list_connections("oa-reset-2")] == ["alice"]
    assert await store.cache_get("oauth:oa-reset-2:discovery") == '{"cached": true}'

    again = await admin.post("/admin/servers/oa-reset/reset")
    assert again.json()["deleted"] == {"connections": 0, "registrations": 0, "cache_entries": 0}
    for sid in ("oa-reset", "oa-reset-2"):
        assert (await admin.delete(f"/admin/servers/{sid}")).status_code == 204


async def test_deleting_a_server_removes_its_secrets_and_tokens(
    admin: httpx.AsyncClient, store: SQLiteStore, keyring: Keyring, upstream: Upstream
) -> None:
    await create(admin, "doomed", url=OAUTH_URL, auth="oauth")
    await create(admin, "doomed-key", url=upstream.mcp_url, auth="api_key")
    await admin.put("/admin/servers/doomed-key/api-key", json={"api_key": UPSTREAM_KEY})
    await admin.put("/admin/servers/doomed/oauth-client", json={"client_id": "c", "client_secret": "s" * 20})
    await seed_registration(store, keyring, "doomed")
    for user in ("alice", "bob", "carol"):
        await seed_connection(store, keyring, user, "doomed")
    await store.cache_set("oauth:doomed:discovery", "{}", 3600)
    await create(admin, "doomed-2", url=OAUTH_URL, auth="oauth")
    await seed_connection(store, keyring, "alice", "doomed-2")

    assert (await admin.delete("/admin/servers/doomed")).status_code == 204
    assert (await admin.delete("/admin/servers/doomed-key")).status_code == 204
    names = [(k, n) for k, n, _ in await store.list_secrets()]
    assert not [n for _, n in names if n in ("doomed", "doomed-key") or n.startswith("doomed|")]
    assert await store.list_connections("doomed") == []
    for user in ("alice", "bob", "carol"):
        assert "doomed" not in {c.server for c in await store.list_user_connections(user)}
    assert await store.cache_get("oauth:doomed:discovery") is None
    # another server's users are untouched
    assert [c.user for c in await store.list_connections("doomed-2")] == ["alice"]

    # the id can be used again, and nothing of the old server comes back
    await create(admin, "doomed-key", url=upstream.mcp_url, auth="api_key")
    assert (await admin.get("/admin/servers/doomed-key/api-key")).json()["set"] is False
    await create(admin, "doomed", url=OAUTH_URL, auth="oauth")
    assert (await admin.get("/admin/servers/doomed/connections")).json()["connections"] == []
    assert (await admin.get("/admin/servers/doomed/oauth-client")).json()["set"] is False
    for sid in ("doomed", "doomed-key", "doomed-2"):
        assert (await admin.delete(f"/admin/servers/{sid}")).status_code == 204


async def test_changing_url_drops_tokens_issued_for_the_old_one(
    admin: httpx.AsyncClient, store: SQLiteStore, keyring: Keyring
) -> None:
    await create(admin, "moving", url=OAUTH_URL, auth="oauth")
    await seed_connection(store, keyring, "alice", "moving")
    same = await admin.put("/admin/servers/moving", json={"url": OAUTH_URL, "auth": "oauth"})
    assert same.status_code == 200
    assert [c.user for c in await store.list_connections("moving")] == ["alice"]
    moved = await admin.put("/admin/servers/moving", json={"url": "https://127.0.0.2:9/mcp", "auth": "oauth"})
    assert moved.status_code == 200
    assert await store.list_connections("moving") == []
    assert (await admin.delete("/admin/servers/moving")).status_code == 204


# -- caller tokens ---------------------------------------------------------------------


async def test_caller_tokens(admin: httpx.AsyncClient, store: SQLiteStore) -> None:
    answer = await admin.post("/admin/tokens", json={"users": ["alice", "bob"], "label": "ci runner"})
    assert answer.status_code == 201
    assert answer.headers["cache-control"] == "no-store"
    created = answer.json()
    value, token_id = created["token"], created["id"]
    assert value.startswith(f"kbp_{token_id}.")
    assert created["users"] == ["alice", "bob"] and created["label"] == "ci runner"

    listed = await admin.get("/admin/tokens")
    mine = [t for t in listed.json()["tokens"] if t["id"] == token_id]
    assert mine == [
        {"id": token_id, "users": ["alice", "bob"], "label": "ci runner", "created": created["created"]}
    ]
    secret = value.partition(".")[2]
    assert secret not in listed.text and "digest" not in listed.text
    sealed = await store.get_secret("proxy_token", token_id)
    assert sealed is not None and secret not in sealed

    assert (await admin.delete(f"/admin/tokens/{token_id}")).status_code == 204
    assert token_id not in {t["id"] for t in (await admin.get("/admin/tokens")).json()["tokens"]}
    assert await store.get_secret("proxy_token", token_id) is None
    assert (await admin.delete(f"/admin/tokens/{token_id}")).status_code == 404


# -- the CLI ---------------------------------------------------------------------------------


def cli_json(proxy: ProxyProcess, *args: str, input: str | None = None) -> Any:
    result = proxy.cli(*args, "--json", input=input)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_cli_servers_and_keys(
    proxy: ProxyProcess, upstream: Upstream, admin: httpx.AsyncClient
) -> None:
    added = cli_json(proxy, "servers", "add", "cli-srv", "--url", upstream.mcp_url, "--auth", "api_key",
                     "--set", "api_key_header=X-CLI-Key", "--set", "api_key_scheme=Token")  # fmt: skip
    assert (added["id"], added["source"], added["api_key_header"]) == ("cli-srv", "store", "X-CLI-Key")
    rows = {r["id"]: r for r in cli_json(proxy, "servers", "list")}
    assert rows["cli-srv"]["auth"] == "api_key" and rows[FIXED]["source"] == "config"

    result = proxy.cli("api-key", "set", "cli-srv", "--json", input=UPSTREAM_KEY + "\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "server": "cli-srv"}
    assert UPSTREAM_KEY not in result.stdout + result.stderr
    shown = cli_json(proxy, "api-key", "show", "cli-srv")
    assert shown == {"server": "cli-srv", "set": True, "source": "stored", "last4": UPSTREAM_KEY[-4:],
                     "length": len(UPSTREAM_KEY)}  # fmt: skip

    # the serving process picks up what the CLI wrote (SQLite: a 1 s poll)
    url = f"{proxy.url}/alice/cli-srv"
    deadline = time.monotonic() + 5
    while (await raw_post(url, INITIALIZE)).status_code != 200:
        assert time.monotonic() < deadline, "the serving proxy never saw the CLI's server and key"
        await asyncio.sleep(0.05)
    async with streamable_session(url) as session:
        seen = json.loads(result_text(await session.call_tool("headers", {})))
    assert seen["x-cli-key"] == f"Token {UPSTREAM_KEY}"
    assert (await admin.get("/admin/servers/cli-srv/api-key")).json()["set"] is True

    # bad input: exit 2, naming what is wrong; nothing stored
    bad_id = proxy.cli("servers", "add", "Bad_Id", "--url", upstream.mcp_url, "--auth", "none")
    assert bad_id.returncode == 2 and "server id" in bad_id.stderr
    bad_url = proxy.cli("servers", "add", "cli-bad", "--url", "ftp://x.example/mcp", "--auth", "none")
    assert bad_url.returncode == 2 and "url" in bad_url.stderr
    bad_key = proxy.cli(
        "servers", "add", "cli-bad", "--url", upstream.mcp_url, "--auth", "none", "--set", "colour=red"
    )
    assert bad_key.returncode == 2 and "colour" in bad_key.stderr
    bad_auth = proxy.cli("servers", "add", "cli-bad", "--url", upstream.mcp_url, "--auth", "magic")
    assert bad_auth.returncode == 2
    unknown = proxy.cli("api-key", "set", "nosuch", input="k" * 20 + "\n")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr
    assert "cli-bad" not in {r["id"] for r in cli_json(proxy, "servers", "list")}
    # a failed operation: exit 1
    read_only = proxy.cli("servers", "remove", FIXED)
    assert read_only.returncode == 1 and "read-only" in read_only.stderr

    removed = cli_json(proxy, "servers", "remove", "cli-srv")
    assert removed == {"ok": True, "id": "cli-srv"}
    assert "cli-srv" not in {r["id"] for r in cli_json(proxy, "servers", "list")}
    nothing = proxy.cli("api-key", "clear", FIXED)
    assert nothing.returncode == 1 and "no stored API key" in nothing.stderr


async def test_cli_connections_reset_and_tokens(
    proxy: ProxyProcess, admin: httpx.AsyncClient, store: SQLiteStore, keyring: Keyring
) -> None:
    await create(admin, "cli-oauth", url=OAUTH_URL, auth="oauth")
    for user in ("alice", "bob"):
        await seed_connection(store, keyring, user, "cli-oauth")
    await seed_registration(store, keyring, "cli-oauth")
    rows = cli_json(proxy, "connections", "list", "cli-oauth")
    assert [(r["user"], r["state"]) for r in rows] == [("alice", "connected"), ("bob", "connected")]
    assert "sealed" not in rows[0]
    assert cli_json(proxy, "reset", "cli-oauth") == {
        "server": "cli-oauth",
        "deleted": {"connections": 2, "registrations": 1, "cache_entries": 0},
    }
    assert cli_json(proxy, "connections", "list", "cli-oauth") == []
    missing = proxy.cli("connections", "delete", "cli-oauth", "alice")
    assert missing.returncode == 1

    created = cli_json(proxy, "tokens", "create", "--user", "alice", "--label", "from cli")
    assert created["token"].startswith(f"kbp_{created['id']}.") and created["users"] == ["alice"]
    listed = proxy.cli("tokens", "list", "--json")
    assert listed.returncode == 0
    assert created["id"] in {t["id"] for t in json.loads(listed.stdout)}
    assert created["token"] not in listed.stdout
    bad = proxy.cli("tokens", "create", "--user", "not a user")
    assert bad.returncode == 2
    assert cli_json(proxy, "tokens", "revoke", created["id"]) == {"ok": True}
    twice = proxy.cli("tokens", "revoke", created["id"])
    assert twice.returncode == 1 and created["id"] in twice.stderr  # nothing left to delete
    assert created["id"] not in {t["id"] for t in cli_json(proxy, "tokens", "list")}
    assert await store.get_secret("proxy_token", created["id"]) is None
    assert (await admin.delete("/admin/servers/cli-oauth")).status_code == 204


def test_store_file_holds_no_plaintext(proxy: ProxyProcess, baseline: dict[str, Any]) -> None:
    db = Path(proxy.config["database_url"].removeprefix("sqlite:///"))
    for path in db.parent.glob(db.name + "*"):  # the WAL too
        data = path.read_bytes()
        for secret in (UPSTREAM_KEY.encode(), CLIENT_SECRET.encode()):
            assert secret not in data, path
