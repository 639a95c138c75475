"""Servers the organisation authorizes: `grant: identity_assertion` (ID-JAG).

Three replicas share PostgreSQL and Redis. The organisation (peers.enterprise)
signs people in and exchanges their ID tokens for ID-JAGs by a policy table;
two authorization servers of its own take those in the JWT bearer grant, each
in front of an MCP SDK server. A person signs in once (the real /login flow,
the provider signing them in at once) and their agent, which holds no cookie,
then uses every server the policy allows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from peers.enterprise import Enterprise, run_enterprise
from peers.mcp_client import INITIALIZE, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from services import REDIS_URL
from support import ProxyProcess, free_port

from proxy.settings import ConfigError, Settings, _check_login, parse_server
from proxy.stores.redis import RedisTokenStore

pytestmark = pytest.mark.slow
LOGIN_CLIENT, LOGIN_SECRET = "keybearer-login", "login-secret-0123456789abcdef"
AS_SECRET = "as-secret-0123456789abcdef"
TTL = 4  # seconds an access token of server `one` lives


@pytest.fixture(scope="module")
def org() -> Iterator[Enterprise]:
    with run_enterprise() as enterprise:
        enterprise.add_client(LOGIN_CLIENT, LOGIN_SECRET)
        yield enterprise


@pytest.fixture(scope="module")
def servers(org: Enterprise) -> Iterator[dict[str, ResourceServer]]:
    """`one` and `two`, each trusting its own authorization server at the organisation."""
    with (
        run_resource_server(f"{org.origin}/as/one") as one,
        run_resource_server(f"{org.origin}/as/two") as two,
    ):
        org.add_auth_server("one", one.mcp_url, "kb-at-one", AS_SECRET, token_ttl=TTL)
        org.add_auth_server("two", two.mcp_url, "kb-at-two", AS_SECRET)
        yield {"one": one, "two": two}


@pytest.fixture(scope="module")
def replicas(
    org: Enterprise,
    servers: dict[str, ResourceServer],
    postgres_database: str,
    redis_prefix: str,
    salt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ProxyProcess]]:
    ports = [free_port() for _ in range(3)]
    managed = {"auth": "oauth", "grant": "identity_assertion", "client_secret_env": "AS_SECRET"}
    config = {
        "public_url": f"http://127.0.0.1:{ports[0]}",
        "database_url": postgres_database,
        "redis_url": REDIS_URL,
        "redis_prefix": f"{redis_prefix}-idjag",
        "migrate_on_start": True,
        "oauth_allow_http_loopback": True,
        "refresh_skew": 1,
        "token_endpoint_cooldown": 3,
        "login_issuer": org.idp_issuer,
        "login_client_id": LOGIN_CLIENT,
        "servers": {
            "one": {"url": servers["one"].mcp_url, "client_id": "kb-at-one", **managed},
            "two": {"url": servers["two"].mcp_url, "client_id": "kb-at-two", **managed},
        },
    }
    env = {"KEYBEARER_SALT": salt, "KEYBEARER_LOGIN_CLIENT_SECRET": LOGIN_SECRET, "AS_SECRET": AS_SECRET}
    procs: list[ProxyProcess] = []
    try:
        for port in ports:
            procs.append(ProxyProcess(config, tmp_path_factory.mktemp(f"idjag-{port}"), env, port=port))
        yield procs
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:  # no ID token, ID-JAG or access token (all JWTs) in any log
        assert "eyJ" not in proc.log()


def issuer(org: Enterprise, name: str) -> str:
    return org.auth_servers[name].issuer


async def sign_in(proxy: ProxyProcess, org: Enterprise, user: str) -> httpx.AsyncClient:
    """The browser's journey: /login, the provider (which signs `user` in at once), the callback, home."""
    org.sign_in_as = user
    browser = httpx.AsyncClient(base_url=proxy.url, follow_redirects=True, timeout=30)
    home = await browser.get("/login", params={"next": "/"})
    assert home.status_code == 200 and str(home.url) == f"{proxy.url}/", (home.status_code, home.url)
    return browser


async def whoami(proxy: ProxyProcess, user: str, server: str) -> dict[str, Any]:
    async with streamable_session(f"{proxy.url}/{user}/{server}") as session:
        me: dict[str, Any] = json.loads(result_text(await session.call_tool("whoami", {})))
        return me


async def initialize(proxy: ProxyProcess, user: str, server: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            f"{proxy.url}/{user}/{server}/mcp",
            json=INITIALIZE,
            headers={"accept": "application/json, text/event-stream"},
        )
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        data = next(line[5:] for line in r.text.splitlines() if line.startswith("data:"))
        return r.status_code, json.loads(data)
    return r.status_code, r.json()


def test_the_grant_needs_a_static_client_and_the_sign_in() -> None:
    with pytest.raises(ConfigError, match="client_id: required with grant: identity_assertion"):
        parse_server("x", {"url": "https://mcp.example.com/mcp", "auth": "oauth", "grant": "identity_assertion"},
                     key="servers.x")  # fmt: skip
    server = parse_server("x", {"url": "https://mcp.example.com/mcp", "auth": "oauth", "grant": "identity_assertion",
                                "client_id": "kb"}, key="servers.x")  # fmt: skip
    assert server.credential_kind == "identity_assertion"
    with pytest.raises(ConfigError, match="set login_issuer and login_client_id"):
        _check_login(Settings(servers={"x": server}))


async def test_no_sign_in_gets_the_sign_in_link(org: Enterprise, replicas: list[ProxyProcess]) -> None:
    org.allow("nadia", issuer(org, "one"))
    status, answer = await initialize(replicas[1], "nadia", "one")
    assert status == 200, answer
    error = answer["error"]
    assert error["code"] == -32042
    link = error["data"]["elicitations"][0]["url"]
    assert link == f"{replicas[0].url}/login?next=%2F"
    assert "sign in" in error["message"] and "every server your organisation manages" in error["message"]
    assert org.exchanges[("nadia", issuer(org, "one"))] == 0  # nothing to exchange: nothing asked


async def test_one_sign_in_serves_every_allowed_server_and_the_policy_refusal_is_clear(
    org: Enterprise, replicas: list[ProxyProcess]
) -> None:
    org.allow("alice", issuer(org, "one"))
    org.allow("alice", issuer(org, "two"))
    org.allow("bob", issuer(org, "one"))  # bob may not use two
    for user in ("alice", "bob"):
        browser = await sign_in(replicas[0], org, user)
        await browser.aclose()
    # The agents hold no cookie, and ask other replicas than the one signed in at.
    for server in ("one", "two"):
        me = await whoami(replicas[1], "alice", server)
        assert (me["sub"], me["iss"], me["client_id"]) == ("alice", issuer(org, server), f"kb-at-{server}")
    assert (await whoami(replicas[2], "bob", "one"))["sub"] == "bob"
    status, answer = await initialize(replicas[2], "bob", "two")
    assert status == 403, answer
    error = answer["error"]
    assert error["code"] == -32000 and error["data"]["error"] == "not_allowed_by_organisation"
    assert "your organisation does not allow you to use two" in error["message"]
    assert "elicitations" not in error["data"]  # no link: nobody's consent can change it
    assert org.refusals == []  # every ID-JAG the authorization servers saw was right


async def test_one_exchange_per_user_and_server_per_expiry_across_replicas(
    org: Enterprise, replicas: list[ProxyProcess]
) -> None:
    org.allow("carol", issuer(org, "one"))
    browser = await sign_in(replicas[0], org, "carol")
    await browser.aclose()
    key = ("carol", issuer(org, "one"))
    results = await asyncio.gather(*(initialize(replicas[i % 3], "carol", "one") for i in range(12)))
    assert all(status == 200 and "result" in answer for status, answer in results), results
    assert (org.exchanges[key], org.grants[key]) == (1, 1)
    started = time.monotonic()
    while org.grants[key] < 2 and time.monotonic() - started < 30:
        await asyncio.gather(*(initialize(replicas[i], "carol", "one") for i in range(3)))
        await asyncio.sleep(0.5)
    # Re-obtained ahead of expiry: a new exchange, once, for every replica.
    assert (org.exchanges[key], org.grants[key]) == (2, 2)


async def test_the_authorization_server_refusing_is_the_operators_to_fix(
    org: Enterprise, replicas: list[ProxyProcess]
) -> None:
    org.allow("dave", issuer(org, "two"))
    browser = await sign_in(replicas[0], org, "dave")
    await browser.aclose()
    org.auth_servers["two"].refuse = True
    try:
        status, answer = await initialize(replicas[0], "dave", "two")
    finally:
        org.auth_servers["two"].refuse = False
    assert status == 503, answer
    error = answer["error"]
    assert error["data"]["error"] == "service_token_failed" and error["data"]["server"] == "two"
    assert "authorization server of server 'two' refused the ID-JAG" in error["message"]
    assert "the operator must" in error["message"]


async def test_signing_out_ends_the_exchanges_in_the_persons_name(
    org: Enterprise, replicas: list[ProxyProcess]
) -> None:
    org.allow("erin", issuer(org, "one"))
    org.allow("erin", issuer(org, "two"))
    browser = await sign_in(replicas[0], org, "erin")
    assert (await whoami(replicas[1], "erin", "one"))["sub"] == "erin"
    page = await browser.get("/logout")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert (await browser.post("/logout", data={"csrf": csrf})).status_code == 200
    await browser.aclose()
    status, answer = await initialize(replicas[2], "erin", "two")
    assert (status, answer["error"]["code"]) == (200, -32042), answer


async def test_the_id_token_is_kept_sealed_and_a_provider_failure_is_the_operators(
    org: Enterprise, replicas: list[ProxyProcess], redis_prefix: str
) -> None:
    org.allow("fay", issuer(org, "two"))
    browser = await sign_in(replicas[0], org, "fay")
    await browser.aclose()
    store = RedisTokenStore.from_url(REDIS_URL, prefix=f"{redis_prefix}-idjag")
    await store.open()
    try:
        sealed = await store.cache_get("login:id_token:fay:")
    finally:
        await store.close()
    assert sealed and "eyJ" not in sealed
    org.exchange_error = "unsupported_grant_type"
    try:
        status, answer = await initialize(replicas[1], "fay", "two")
    finally:
        org.exchange_error = None
    assert status == 503, answer
    error = answer["error"]
    assert error["data"] == {"error": "identity_provider_failed", "server": "two"}
    assert "the operator must allow Keybearer's sign-in client the token exchange" in error["message"]
    assert (await whoami(replicas[1], "fay", "two"))["sub"] == "fay"  # nothing recorded: fine once fixed
