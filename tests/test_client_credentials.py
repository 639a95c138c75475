"""Servers that act for a service, not a person: `grant: client_credentials`.

Three replicas share PostgreSQL and Redis in front of a protected MCP SDK
server; oidc-provider issues 4-second tokens to static clients that
authenticate with client_secret_basic, client_secret_post (stored through the
CLI) and private_key_jwt (RS256, and ES256 with a kid and the issuer as aud).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey
from peers.mcp_client import INITIALIZE, jsonrpc, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import AuthorizationServer, run_authorization_server
from services import REDIS_URL
from support import ProxyProcess, free_port, start_all, stop_all

from proxy import links
from proxy.crypto import Keyring
from proxy.names import SERVICE_USER
from proxy.settings import ConfigError, parse_server
from proxy.stores import Connection
from proxy.stores.redis import RedisTokenStore

pytestmark = pytest.mark.slow
TTL = 4
ADMIN = "client-credentials-admin-token-0123"
BASIC_SECRET = "basic-secret-0123456789abcdef"
POST_SECRET = "post-secret-0123456789abcdef"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _client(client_id: str, method: str, **extra: Any) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "token_endpoint_auth_method": method,
        **extra,
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    paths = {}
    for name, key in (
        ("rsa", rsa.generate_private_key(65537, 2048)),
        ("ec", ec.generate_private_key(ec.SECP256R1())),
    ):
        paths[name] = folder / f"{name}.pem"
        paths[name].write_text(_pem(key))
    return paths


@pytest.fixture(scope="module")
def auth(keys: dict[str, Path]) -> Iterator[AuthorizationServer]:
    rsa_public = RSAKey.import_key(keys["rsa"].read_text()).as_dict(private=False)
    ec_public = {**ECKey.import_key(keys["ec"].read_text()).as_dict(private=False), "kid": "ec-1"}
    with run_authorization_server(access_token_ttl=TTL) as server:
        for client_id in ("cc-shared", "cc-storm", "cc-wrong", "cc-revoked", "cc-foreign"):
            server.add_client(_client(client_id, "client_secret_basic", client_secret=BASIC_SECRET))
        server.add_client(_client("cc-post", "client_secret_post", client_secret=POST_SECRET))
        server.add_client(_client("cc-rsa", "private_key_jwt", jwks={"keys": [rsa_public]}))
        server.add_client(_client("cc-ec", "private_key_jwt", jwks={"keys": [ec_public]}))
        yield server


@pytest.fixture(scope="module")
def resource(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(auth.issuer) as server:
        yield server


@pytest.fixture(scope="module")
def revoking(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    """A second server of the same authorization server, to revoke tokens at without touching others."""
    with run_resource_server(auth.issuer) as server:
        yield server


@pytest.fixture(scope="module")
def foreign(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    """Names `auth` in its metadata but trusts only another issuer: it refuses every token it gets."""
    with run_resource_server(
        "http://127.0.0.1:9/other-issuer", authorization_servers=[auth.issuer], jwks_uri=auth.endpoint("jwks")
    ) as server:
        yield server


@pytest.fixture(scope="module")
def prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}-cc"


def _service(url: str, client_id: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "auth": "oauth", "grant": "client_credentials", "client_id": client_id, **extra}


@pytest.fixture(scope="module")
def replicas(
    auth: AuthorizationServer,
    resource: ResourceServer,
    revoking: ResourceServer,
    foreign: ResourceServer,
    keys: dict[str, Path],
    postgres_database: str,
    prefix: str,
    salt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ProxyProcess]]:
    ports = [free_port() for _ in range(3)]
    secret = {"client_secret_env": "CC_BASIC_SECRET"}
    config = {
        "public_url": f"http://127.0.0.1:{ports[0]}",
        "database_url": postgres_database,
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "migrate_on_start": True,
        "admin_token": ADMIN,
        "oauth_allow_http_loopback": True,
        "refresh_skew": 1,
        "refresh_lock_ttl": 3,
        "token_endpoint_cooldown": 2,
        "servers": {
            "shared": _service(resource.mcp_url, "cc-shared", **secret),
            "storm": _service(resource.mcp_url, "cc-storm", **secret),
            "wrong": _service(resource.mcp_url, "cc-wrong", client_secret_env="CC_WRONG_SECRET"),
            "post": _service(resource.mcp_url, "cc-post"),
            "rsa": _service(resource.mcp_url, "cc-rsa", client_private_key_file=str(keys["rsa"])),
            "ec": _service(
                resource.mcp_url,
                "cc-ec",
                client_private_key_file=str(keys["ec"]),
                client_key_id="ec-1",
                client_assertion_audience="issuer",
            ),
            "revoked": _service(revoking.mcp_url, "cc-revoked", **secret),
            "foreign": _service(foreign.mcp_url, "cc-foreign", **secret),
            "people": {"url": resource.mcp_url, "auth": "oauth"},
        },
    }
    env = {"KEYBEARER_SALT": salt, "CC_BASIC_SECRET": BASIC_SECRET, "CC_WRONG_SECRET": "not-the-secret"}
    procs = [
        ProxyProcess(config, tmp_path_factory.mktemp(f"replica-{port}"), env, port=port, start=False)
        for port in ports
    ]
    try:
        yield start_all(procs)
    finally:
        stop_all(procs)


@pytest.fixture
async def tokens(prefix: str) -> AsyncIterator[RedisTokenStore]:
    store = RedisTokenStore.from_url(REDIS_URL, prefix=prefix)
    await store.open()
    yield store
    await store.close()


def client_credentials_requests(auth: AuthorizationServer, client_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in auth.stats()["token_log"]
        if e["grant_type"] == "client_credentials" and e["client_id"] == client_id
    ]


async def call(replica: ProxyProcess, user: str, server: str, client: httpx.AsyncClient) -> httpx.Response:
    return await client.post(
        f"{replica.url}/{user}/{server}",
        json=INITIALIZE,
        headers={"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"},
    )


async def whoami(replica: ProxyProcess, user: str, server: str) -> dict[str, Any]:
    async with streamable_session(f"{replica.url}/{user}/{server}") as session:
        me: dict[str, Any] = json.loads(result_text(await session.call_tool("whoami", {})))
        return me


async def wait_due(tokens: RedisTokenStore, server: str) -> Connection:
    """Until the stored service token is due for renewal: refresh_skew (1 s) before it
    expires, or a quarter of its lifetime before if that is less (TokenLifecycle.ahead)."""
    conn = await tokens.get_connection(SERVICE_USER, server)
    assert conn is not None and conn.expires_at is not None and conn.state == "connected"
    ahead = min(1.0, 0.25 * (conn.expires_at - conn.obtained_at))
    await asyncio.sleep(max(0.0, conn.expires_at - ahead - time.time()) + 0.2)
    return conn


def assert_operator_error(answer: httpx.Response, server: str, *, request_id: int) -> dict[str, Any]:
    """A 503 for the operator: in JSON-RPC, naming the server, never a connect link."""
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["retry-after"]) >= 1
    body = answer.json()
    assert body["id"] == request_id and body["error"]["code"] == -32000
    assert body["error"]["data"]["server"] == server
    assert f"server {server!r}" in body["error"]["message"]
    assert "/connect/" not in answer.text and "-32042" not in answer.text and "elicitation" not in answer.text
    assert "www-authenticate" not in answer.headers
    error: dict[str, Any] = body["error"]
    return error


# -- the shared token ---------------------------------------------------------------------


async def test_every_user_gets_the_same_token(
    replicas: list[ProxyProcess], auth: AuthorizationServer, resource: ResourceServer, tokens: RedisTokenStore
) -> None:
    auth.reset_stats()
    resource.reset_stats()
    alice = await whoami(replicas[0], "alice", "shared")
    bob = await whoami(replicas[1], "bob", "shared")
    assert alice == bob and alice["client_id"] == "cc-shared" and alice["sub"] == "cc-shared"
    assert resource.stats()["distinct_tokens"] == 1
    (request,) = client_credentials_requests(auth, "cc-shared")
    assert request["client_auth"] == "client_secret_basic" and request["status"] == 200
    assert request["resource"] == resource.mcp_url and request["scope"] == "mcp:tools"
    # Stored once, under the service's pseudo-user; no person has a connection.
    assert [c.user for c in await tokens.list_connections("shared")] == [SERVICE_USER]
    assert await tokens.get_connection("alice", "shared") is None


async def test_one_token_request_per_expiry_across_replicas(
    replicas: list[ProxyProcess], auth: AuthorizationServer, tokens: RedisTokenStore
) -> None:
    # The first token lives 2 s (due after 1.5 s, not 3); the renewals get TTL-second ones, which
    # must outlast each storm.
    auth.settings(access_token_ttl=2)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await call(replicas[0], "alice", "storm", client)).status_code == 200
    finally:
        auth.settings(access_token_ttl=TTL)
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    for _ in range(2):
        before = await wait_due(tokens, "storm")
        auth.reset_stats()
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            users = ("alice", "bob", "carol")
            answers = await asyncio.gather(
                *(call(replicas[i % 3], users[i % 3], "storm", client) for i in range(210))
            )
        assert [a.text[:200] for a in answers if a.status_code != 200 or '"result"' not in a.text] == []
        assert len(client_credentials_requests(auth, "cc-storm")) == 1
        after = await tokens.get_connection(SERVICE_USER, "storm")
        assert after is not None and after.version == before.version + 1


async def test_upstream_401_gets_one_new_token_and_a_replay(
    replicas: list[ProxyProcess], auth: AuthorizationServer, revoking: ResourceServer
) -> None:
    async with streamable_session(f"{replicas[0].url}/alice/revoked") as session:
        assert json.loads(result_text(await session.call_tool("whoami", {})))["sub"] == "cc-revoked"
        revoking.deny_seen_tokens()  # the server now refuses the token it just accepted
        revoking.reset_stats()
        auth.reset_stats()
        me = json.loads(result_text(await session.call_tool("whoami", {})))
        assert me["sub"] == "cc-revoked"
    assert len(client_credentials_requests(auth, "cc-revoked")) == 1
    assert revoking.stats()["rejections"] == {"revoked": 1}


# -- client authentication ------------------------------------------------------------------


@pytest.mark.parametrize(("server", "client_id"), [("rsa", "cc-rsa"), ("ec", "cc-ec")])
async def test_private_key_jwt(
    replicas: list[ProxyProcess], auth: AuthorizationServer, server: str, client_id: str
) -> None:
    auth.reset_stats()
    assert (await whoami(replicas[1], "alice", server))["client_id"] == client_id
    (request,) = client_credentials_requests(auth, client_id)
    assert request["client_auth"] == "private_key_jwt" and request["status"] == 200


async def test_client_secret_post_stored_through_the_cli(
    replicas: list[ProxyProcess], auth: AuthorizationServer
) -> None:
    auth.reset_stats()
    # The config names no secret: the operator is told how to give one.
    async with httpx.AsyncClient(timeout=30) as client:
        missing = await call(replicas[0], "alice", "post", client)
    error = assert_operator_error(missing, "post", request_id=1)
    assert "keybearer oauth-client set post" in error["message"]
    # A public client cannot use the grant: refused, and nothing is stored.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=replicas[1].url, headers=admin, timeout=30) as client:
        public = await client.put("/admin/servers/post/oauth-client", json={"client_id": "cc-post"})
        assert public.status_code == 400 and "client_credentials" in public.json()["message"]
        assert (await client.get("/admin/servers/post/oauth-client")).json() == {
            "server": "post",
            "set": False,
        }
    done = replicas[0].cli(
        "oauth-client", "set", "post", "--client-id", "cc-post", "--auth-method", "client_secret_post",
        input=POST_SECRET + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The store's write reaches the other replicas within the poll interval.
    deadline = time.monotonic() + 15
    while True:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await call(replicas[2], "alice", "post", client)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert answer.status_code == 200 and '"result"' in answer.text, answer.text
    (request,) = client_credentials_requests(auth, "cc-post")
    assert request["client_auth"] == "client_secret_post" and request["status"] == 200


# -- failures are the operator's ---------------------------------------------------------


async def test_wrong_secret_is_an_operator_error(
    replicas: list[ProxyProcess], auth: AuthorizationServer, tokens: RedisTokenStore
) -> None:
    auth.reset_stats()
    async with httpx.AsyncClient(timeout=30) as client:
        for i, replica in enumerate(replicas):
            answer = await client.post(
                f"{replica.url}/alice/wrong",
                json=jsonrpc("tools/list", id=40 + i),
                headers={"Accept": "application/json, text/event-stream"},
            )
            error = assert_operator_error(answer, "wrong", request_id=40 + i)
            assert "client credentials of server 'wrong' were refused" in error["message"]
            assert "client_id" in error["message"] and error["data"]["error"] == "service_token_failed"
            assert "not-the-secret" not in answer.text
        plain = await client.get(f"{replicas[1].url}/alice/wrong", headers={"Accept": "text/event-stream"})
        assert plain.status_code == 503 and plain.json()["error"] == "service_token_failed"
        # Recorded once, for every replica: no second try during the cooldown.
        assert len(client_credentials_requests(auth, "cc-wrong")) == 1
        listing = await client.get(
            f"{replicas[2].url}/admin/servers/wrong/connections", headers={"Authorization": f"Bearer {ADMIN}"}
        )
    (row,) = listing.json()["connections"]
    assert row["user"] == SERVICE_USER and row["state"] == "refused" and "invalid_client" in row["last_error"]

    # After the cooldown (2 s) one replica asks again, and is refused again.
    await asyncio.sleep(2.2)
    async with httpx.AsyncClient(timeout=30) as client:
        again = await asyncio.gather(*(call(replicas[i % 3], "bob", "wrong", client) for i in range(9)))
    assert {a.status_code for a in again} == {503}
    assert len(client_credentials_requests(auth, "cc-wrong")) == 2
    conn = await tokens.get_connection(SERVICE_USER, "wrong")
    assert conn is not None and conn.state == "refused"


async def test_server_refusing_fresh_tokens_is_an_operator_error(
    replicas: list[ProxyProcess], auth: AuthorizationServer, foreign: ResourceServer
) -> None:
    auth.reset_stats()
    async with httpx.AsyncClient(timeout=30) as client:
        first = await call(replicas[0], "alice", "foreign", client)
        error = assert_operator_error(first, "foreign", request_id=1)
        assert "refused a service token its authorization server had just issued" in error["message"]
        later = await call(replicas[1], "bob", "foreign", client)
        assert_operator_error(later, "foreign", request_id=1)
    # One token, one new token for the replay, then nothing until the cooldown.
    assert len(client_credentials_requests(auth, "cc-foreign")) == 2
    assert foreign.stats()["rejections"].get("wrong_issuer") == 2


async def test_no_browser_connection_for_a_service_server(replicas: list[ProxyProcess], salt: str) -> None:
    keyring = Keyring(salt)
    async with httpx.AsyncClient(timeout=30) as client:
        connect = await client.get(links.connect_url(replicas[0].url, keyring, "alice", "shared", 600))
        assert connect.status_code == 404
        page = await client.get(links.connections_url(replicas[0].url, keyring, "alice", 600))
    assert page.status_code == 200 and "people" in page.text and "shared" not in page.text


async def test_embedded_store(
    proxy_factory: type[ProxyProcess], auth: AuthorizationServer, resource: ResourceServer
) -> None:
    """One process on the SQLite file: locks, tokens and the cache there."""
    proxy = proxy_factory(
        {
            "oauth_allow_http_loopback": True,
            "servers": {"solo": _service(resource.mcp_url, "cc-solo", client_secret_env="CC_SOLO")},
        },
        env={"CC_SOLO": BASIC_SECRET},
    )
    auth.add_client(_client("cc-solo", "client_secret_basic", client_secret=BASIC_SECRET))
    auth.reset_stats()
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(*(call(proxy, user, "solo", client) for user in ("alice", "bob") * 5))
    assert {a.status_code for a in answers} == {200}
    assert len(client_credentials_requests(auth, "cc-solo")) == 1


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("definition", "key", "says"),
    [
        ({"grant": "client_credentials"}, "client_id", "required with grant: client_credentials"),
        (
            {"grant": "implicit", "client_id": "c"},
            "grant",
            "must be one of authorization_code, client_credentials",
        ),
        (
            {
                "grant": "client_credentials",
                "client_id": "c",
                "client_secret_env": "S",
                "client_private_key_file": "/k.pem",
            },
            "client_secret_env",
            "either a client secret or client_private_key_file",
        ),
        (
            {"grant": "client_credentials", "client_id": "c", "client_key_id": "k"},
            "client_key_id",
            "only meaningful with client_private_key_file",
        ),
        (
            {"client_id": "c", "client_private_key_file": "/k.pem"},
            "client_private_key_file",
            "only meaningful with grant: client_credentials",
        ),
        (
            {
                "grant": "client_credentials",
                "client_id": "c",
                "client_private_key_file": "/k.pem",
                "client_assertion_audience": "everyone",
            },
            "client_assertion_audience",
            "must be one of token_endpoint, issuer",
        ),
    ],
)
def test_definition_errors(definition: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_server(
            "svc", {"url": "https://mcp.example/mcp", "auth": "oauth", **definition}, key="servers.svc"
        )
    assert caught.value.key == f"servers.svc.{key}" and says in str(caught.value)


def test_grant_needs_oauth() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_server("svc", {"url": "https://mcp.example/mcp", "auth": "api_key", "grant": "client_credentials"},
                     key="servers.svc")  # fmt: skip
    assert caught.value.key == "servers.svc.grant"
