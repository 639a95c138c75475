"""Servers the organisation authorizes: `grant: identity_assertion` (ID-JAG).

Three replicas share PostgreSQL and Redis. The organisation (peers.enterprise)
signs people in and exchanges their ID tokens for ID-JAGs by a policy table;
two authorization servers of its own take those in the JWT bearer grant, each
in front of an MCP SDK server. A person signs in once (the real /login flow,
the provider signing them in at once, or in Chromium at its sign-in page) and
their agent, which holds no cookie, then uses every server the policy allows,
while the sign-in is renewed with the provider's refresh token. With
`inbound_auth: jwt`, the agent's own ID token is the subject instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from peers.browser import new_context
from peers.enterprise import Enterprise, run_enterprise
from peers.mcp_client import INITIALIZE, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from playwright.async_api import Browser
from services import REDIS_URL
from support import ProxyProcess, free_port, replicas_running

from proxy.settings import ConfigError, Settings, _check_login, parse_server
from proxy.stores.redis import RedisTokenStore

pytestmark = pytest.mark.slow
LOGIN_CLIENT, LOGIN_SECRET = "keybearer-login", "login-secret-0123456789abcdef"
AS_SECRET = "as-secret-0123456789abcdef"
ADMIN = "idjag-admin-token-0123456789abcdef"
TTL = 4  # seconds an access token of server `one` lives
COOLDOWN = 3  # token_endpoint_cooldown: how long a recorded refusal is answered from its record


@pytest.fixture(scope="module")
def org() -> Iterator[Enterprise]:
    with run_enterprise() as enterprise:
        enterprise.add_client(LOGIN_CLIENT, LOGIN_SECRET)
        yield enterprise


@pytest.fixture(scope="module")
def servers(org: Enterprise) -> Iterator[dict[str, ResourceServer]]:
    """`one`, `two` and `three`, each trusting its own authorization server at the organisation."""
    with (
        run_resource_server(f"{org.origin}/as/one") as one,
        run_resource_server(f"{org.origin}/as/two") as two,
        run_resource_server(f"{org.origin}/as/three") as three,
    ):
        org.add_auth_server("one", one.mcp_url, "kb-at-one", AS_SECRET, token_ttl=TTL)
        org.add_auth_server("two", two.mcp_url, "kb-at-two", AS_SECRET)
        org.add_auth_server("three", three.mcp_url, "kb-at-three", AS_SECRET)
        yield {"one": one, "two": two, "three": three}


def managed_servers(servers: dict[str, ResourceServer]) -> dict[str, dict[str, Any]]:
    managed = {"auth": "oauth", "grant": "identity_assertion", "client_secret_env": "AS_SECRET"}
    return {name: {"url": s.mcp_url, "client_id": f"kb-at-{name}", **managed} for name, s in servers.items()}


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
    config = {
        "public_url": f"http://127.0.0.1:{ports[0]}",
        "database_url": postgres_database,
        "redis_url": REDIS_URL,
        "redis_prefix": f"{redis_prefix}-idjag",
        "migrate_on_start": True,
        "oauth_allow_http_loopback": True,
        "refresh_skew": 1,
        "token_endpoint_cooldown": COOLDOWN,
        "login_issuer": org.idp_issuer,
        "login_client_id": LOGIN_CLIENT,
        "servers": managed_servers(servers),
    }
    env = {"KEYBEARER_SALT": salt, "KEYBEARER_LOGIN_CLIENT_SECRET": LOGIN_SECRET, "AS_SECRET": AS_SECRET,
           "KEYBEARER_ADMIN_TOKEN": ADMIN}  # fmt: skip
    with replicas_running(config, ports, env, tmp_path_factory) as procs:
        yield procs
    for proc in procs:  # no ID token, ID-JAG or access token (all JWTs) in any log
        assert "eyJ" not in proc.log()


def issuer(org: Enterprise, name: str) -> str:
    return org.auth_servers[name].issuer


async def stored(redis_prefix: str, key: str) -> str | None:
    store = RedisTokenStore.from_url(REDIS_URL, prefix=f"{redis_prefix}-idjag")
    await store.open()
    try:
        return await store.cache_get(key)
    finally:
        await store.close()


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
    sealed = await stored(redis_prefix, "login:id_token:fay:")
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


# -- the state of managed servers, for people and operators ----------------------------------


def admin(proxy: ProxyProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proxy.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)


async def connection(proxy: ProxyProcess, server: str, user: str) -> dict[str, Any] | None:
    async with admin(proxy) as api:
        answer = await api.get(f"/admin/servers/{server}/connections")
    assert answer.status_code == 200, answer.text
    return next((c for c in answer.json()["connections"] if c["user"] == user), None)


async def home(browser: httpx.AsyncClient) -> dict[str, str]:
    """The person's home page: each server's row, by server id."""
    page = await browser.get("/")
    assert page.status_code == 200, page.text
    assert "/connect/" not in page.text  # nothing to connect: the organisation manages both servers
    rows = (row.partition("</tr>")[0] for row in page.text.split("<tr>")[1:])
    return {m.group(1): row for row in rows if (m := re.match(r"<td><strong>([^<]+)</strong>", row))}


async def console(proxy: ProxyProcess, path: str) -> str:
    async with admin(proxy) as api:
        link = (await api.post("/admin/links", json={"console": True})).json()["console_url"]
    async with httpx.AsyncClient(follow_redirects=True, timeout=30) as operator:
        assert (await operator.get(link)).status_code == 200
        page = await operator.get(proxy.url + path)
    assert page.status_code == 200, page.text
    return page.text


async def drop_id_token(redis_prefix: str, user: str) -> None:
    """As when the provider's session ends and the ID token runs out."""
    store = RedisTokenStore.from_url(REDIS_URL, prefix=f"{redis_prefix}-idjag")
    await store.open()
    try:
        await store.cache_delete_prefix(f"login:id_token:{user}:")
    finally:
        await store.close()


async def test_a_policy_refusal_is_remembered_briefly_and_every_page_says_each_state(
    org: Enterprise, replicas: list[ProxyProcess], redis_prefix: str
) -> None:
    org.allow("hana", issuer(org, "one"))  # not two
    browser = await sign_in(replicas[0], org, "hana")
    rows = await home(browser)
    assert "managed by your organisation" in rows["one"] and "not yet obtained" in rows["one"]
    assert "Forget token" not in rows["one"]
    assert (await whoami(replicas[1], "hana", "one"))["sub"] == "hana"
    obtained = time.monotonic()
    key = ("hana", issuer(org, "two"))

    started = time.monotonic()
    answers = [*await asyncio.gather(*(initialize(replicas[i % 3], "hana", "two") for i in range(6)))]
    answers += [await initialize(proxy, "hana", "two") for proxy in replicas]
    for status, answer in answers:
        assert (status, answer["error"]["data"]["error"]) == (403, "not_allowed_by_organisation"), answer
        assert "your organisation does not allow you to use two" in answer["error"]["message"]
    # One exchange for all nine, on three replicas (unless the machine took longer than the window).
    assert org.exchanges[key] <= 1 + (time.monotonic() - started) // COOLDOWN, org.exchanges[key]
    exchanged = org.exchanges[key]

    recorded = await connection(replicas[2], "two", "hana")
    assert recorded is not None and recorded["state"] == "not_allowed", recorded
    assert recorded["expires_at"] is None and "does not allow you to use two" in recorded["last_error"]
    rows = await home(browser)
    assert "not allowed by your organisation" in rows["two"] and "(since " in rows["two"]
    assert "Forget token" not in rows["two"]
    assert "connected" in rows["one"] and "Forget token" in rows["one"]
    page = await console(replicas[1], "/admin/console/servers/two")
    assert "Managed by the organisation" in page and "not allowed" in page and "hana" in page
    index = await console(replicas[1], "/admin/console")
    assert "managed by the organisation" in index and "hana:" not in index  # the person's, not the operator's
    listed = replicas[0].cli("connections", "list", "two")
    assert listed.returncode == 0 and re.search(r"hana\s+not_allowed\s+since ", listed.stdout), listed
    async with admin(replicas[0]) as api:
        assert (await api.get("/admin/servers/two")).json()["managed_by"] == "organisation"

    # The provider's session ends; once the token of `one` runs out, the person must sign in again.
    await drop_id_token(redis_prefix, "hana")
    await asyncio.sleep(max(obtained + TTL, started + COOLDOWN) + 0.3 - time.monotonic())
    status, answer = await initialize(replicas[2], "hana", "one")
    assert (status, answer["error"]["code"]) == (200, -32042), answer
    assert (await connection(replicas[0], "one", "hana") or {}).get("state") == "sign_in_required"
    rows = await home(browser)
    assert "needs you to sign in again" in rows["one"] and 'href="/login?next=%2F"' in rows["one"]
    await browser.aclose()

    # The organisation allows two now; after the window the provider is asked again.
    org.allow("hana", issuer(org, "two"))
    browser = await sign_in(replicas[0], org, "hana")
    assert (await whoami(replicas[1], "hana", "two"))["sub"] == "hana"
    assert org.exchanges[key] == exchanged + 1
    rows = await home(browser)
    assert "not yet obtained" in rows["one"] and "connected" in rows["two"]

    # Forgetting the token: nothing stored, and the next use obtains another.
    page = (await browser.get("/")).text
    form = page.split('action="/connections/hana/two/disconnect"', 1)[1]
    csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    forgot = await browser.post("/connections/hana/two/disconnect", data={"csrf": csrf})
    assert forgot.status_code == 200 and str(forgot.url) == f"{replicas[0].url}/"
    assert await connection(replicas[2], "two", "hana") is None
    assert "not yet obtained" in (await home(browser))["two"]
    await browser.aclose()


async def test_a_new_client_drops_the_tokens_of_the_old_one(
    org: Enterprise, replicas: list[ProxyProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    org.allow("ivan", issuer(org, "two"))
    browser = await sign_in(replicas[0], org, "ivan")
    await browser.aclose()
    assert (await whoami(replicas[1], "ivan", "two"))["client_id"] == "kb-at-two"
    two = org.auth_servers["two"]
    two.also["kb-new"] = AS_SECRET
    try:
        # The operator moves Keybearer to a new client at two's authorization server (and the provider too).
        two.client_id = "kb-new"
        async with admin(replicas[2]) as api:
            moved = await api.put(
                "/admin/servers/two/oauth-client", json={"client_id": "kb-new", "client_secret": AS_SECRET}
            )
            assert moved.status_code == 200, moved.text
        assert await connection(replicas[0], "two", "ivan") is None
        assert (await whoami(replicas[0], "ivan", "two"))["client_id"] == "kb-new"
        two.client_id = "kb-at-two"
        async with admin(replicas[2]) as api:
            assert (await api.delete("/admin/servers/two/oauth-client")).status_code == 204
        assert (await whoami(replicas[1], "ivan", "two"))["client_id"] == "kb-at-two"

        # A restart with a new client_id in the config: another replica here, on the same stores.
        two.client_id = "kb-new"
        config = {k: v for k, v in replicas[0].config.items() if k != "listen"}
        config["servers"] = {**config["servers"], "two": {**config["servers"]["two"], "client_id": "kb-new"}}
        restarted = ProxyProcess(config, tmp_path_factory.mktemp("idjag-restart"), replicas[0].env)
        try:
            assert (await whoami(restarted, "ivan", "two"))["client_id"] == "kb-new"
        finally:
            restarted.stop()
        assert "eyJ" not in restarted.log()
        # And the replicas still configured with the old client drop that token in turn.
        two.client_id = "kb-at-two"
        assert (await whoami(replicas[2], "ivan", "two"))["client_id"] == "kb-at-two"
    finally:
        two.client_id = "kb-at-two"
        two.also.clear()


# -- the subject token: renewed, revoked, the agent's own -----------------------------------


async def agent_calls(
    replicas: list[ProxyProcess], user: str, server: str
) -> list[tuple[int, dict[str, Any]]]:
    """The agent's requests at every replica at once."""
    return await asyncio.gather(*(initialize(replicas[i % 3], user, server) for i in range(6)))


async def test_in_chromium_one_sign_in_serves_three_servers_until_the_organisation_ends_it(
    org: Enterprise, replicas: list[ProxyProcess], browser: Browser, redis_prefix: str
) -> None:
    one, two = issuer(org, "one"), issuer(org, "two")
    org.allow("olga", one)
    org.allow("olga", two)  # and not three
    # The provider shows its sign-in page; its ID tokens live 2 s (1-2 s: whole seconds), `one`'s
    # access tokens 4 s, renewed 1 s ahead: every renewal of `one`'s token finds the ID token due.
    org.sign_in_as, org.id_token_ttl = "", 2
    try:
        async with new_context(browser) as context:
            page = await context.new_page()
            await page.goto(f"{replicas[0].url}/")
            assert page.url.startswith(f"{org.idp_issuer}/authorize"), page.url
            await page.fill("input[name=user]", "olga")
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_url(f"{replicas[0].url}/")
            assert "olga" in await page.inner_text("body")
        # No further page: the agent uses the servers through every replica.
        assert (await whoami(replicas[1], "olga", "one"))["sub"] == "olga"
        me = await whoami(replicas[2], "olga", "two")
        assert (me["sub"], me["iss"]) == ("olga", two)  # the server saw its own AS's token, nothing else
        status, answer = await initialize(replicas[0], "olga", "three")
        assert (status, answer["error"]["data"]["error"]) == (403, "not_allowed_by_organisation"), answer
        assert "elicitations" not in answer["error"]["data"]
        assert (org.exchanges[("olga", one)], org.exchanges[("olga", two)]) == (1, 1)
        renewed = org.renewals["olga"]  # 0 to 2: the ID token may be due (0.5 s before expiry) already

        # `one`'s token is re-obtained ahead of its expiry, after the ID token expired:
        # the sign-in is renewed once, and once more the next time (with the rotated refresh token).
        for expiry in (2, 3):
            started = time.monotonic()
            while org.grants[("olga", one)] < expiry and time.monotonic() - started < 15:
                results = await agent_calls(replicas, "olga", "one")
                assert all(status == 200 and "result" in answer for status, answer in results), results
                await asyncio.sleep(0.3)
            assert (org.exchanges[("olga", one)], org.renewals["olga"]) == (expiry, renewed + expiry - 1)

        # The organisation ends her session: at the next renewal the agent gets the sign-in link.
        org.revoke("olga")
        started = time.monotonic()
        while time.monotonic() - started < 15:
            results = await agent_calls(replicas, "olga", "one")
            if any("error" in answer for _, answer in results):
                break
            await asyncio.sleep(0.3)
    finally:
        org.sign_in_as, org.id_token_ttl = "nobody", 300
    errors = [answer["error"] for _, answer in results if "error" in answer]
    assert errors and all(e["code"] == -32042 for e in errors), results
    assert errors[0]["data"]["elicitations"][0]["url"] == f"{replicas[0].url}/login?next=%2F"
    assert (org.exchanges[("olga", one)], org.renewals["olga"]) == (3, renewed + 2)  # nothing exchanged
    assert await stored(redis_prefix, "login:id_token:olga:") is None  # ID token and refresh token gone


async def test_a_refresh_token_is_asked_for_with_prompt_consent_only_when_the_provider_needs_it(
    org: Enterprise, replicas: list[ProxyProcess], redis_prefix: str
) -> None:
    def last_request() -> tuple[str, str]:
        scope, prompt = org.authorize_log[-1]
        return ("offline_access" if "offline_access" in scope.split() else "", prompt)

    def refresh_tokens(user: str) -> int:
        return sum(1 for held, _ in org.refresh_tokens.values() if held == user)

    async def sign_in_once() -> tuple[str, str]:
        await (await sign_in(replicas[0], org, "ivy")).aclose()
        return last_request()

    try:
        org.offline_mode = "consent"  # as oidc-provider: offline_access only with prompt=consent
        assert await sign_in_once() == ("offline_access", "")
        assert refresh_tokens("ivy") == 0
        assert await sign_in_once() == ("offline_access", "consent")  # learned, for every replica
        assert refresh_tokens("ivy") == 1
        org.offline_mode = "never"  # a client the provider gives no refresh token at all
        assert await sign_in_once() == ("offline_access", "consent")
        assert await sign_in_once() == ("", "")  # asked no more
    finally:
        org.offline_mode = "plain"
        store = RedisTokenStore.from_url(REDIS_URL, prefix=f"{redis_prefix}-idjag")
        await store.open()
        await store.cache_delete_prefix("login:offline_access")
        await store.close()
    assert await sign_in_once() == ("offline_access", "")  # Okta, Entra ID, Keycloak: no consent page


@pytest.fixture(scope="module")
def agent_jwt_proxy(
    org: Enterprise, servers: dict[str, ResourceServer], salt: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Agents present the person's ID token (inbound_auth: jwt); users are named by `email`."""
    config = {
        "oauth_allow_http_loopback": True,
        "login_issuer": org.idp_issuer,
        "login_client_id": LOGIN_CLIENT,
        "inbound_auth": "jwt",
        "jwt_issuer": org.idp_issuer,
        "jwt_jwks_url": f"{org.idp_issuer}/jwks",
        "jwt_audience": LOGIN_CLIENT,
        "jwt_user_claim": "email",  # sign-ins name people by `sub`
        "servers": managed_servers(servers),
    }
    env = {"KEYBEARER_SALT": salt, "KEYBEARER_LOGIN_CLIENT_SECRET": LOGIN_SECRET, "AS_SECRET": AS_SECRET}
    proc = ProxyProcess(config, tmp_path_factory.mktemp("idjag-agent-jwt"), env)
    yield proc
    proc.stop()
    assert "eyJ" not in proc.log()


async def test_the_agents_own_id_token_is_the_subject(org: Enterprise, agent_jwt_proxy: ProxyProcess) -> None:
    proxy, one = agent_jwt_proxy, issuer(org, "one")
    for user in ("jo", "kim", "lee"):
        org.allow(user, one)

    async def call(user: str, token: str) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{proxy.url}/{user}/one/mcp", json=INITIALIZE,
                                  headers={"accept": "application/json", "authorization": f"Bearer {token}"})  # fmt: skip
        return r.status_code, r.json()

    # jo never signed in at Keybearer: her agent's ID token is exchanged, and goes nowhere else.
    token = org.id_token("jo", LOGIN_CLIENT, email="jo")
    async with streamable_session(
        f"{proxy.url}/jo/one", headers={"authorization": f"Bearer {token}"}
    ) as session:
        me = json.loads(result_text(await session.call_tool("whoami", {})))
    assert (me["sub"], me["iss"], me["client_id"]) == ("jo", one, "kb-at-one")
    assert org.exchanges[("jo", one)] == 1
    # Tokens inbound auth accepts but that are no ID token of this client for this person:
    # not exchanged; without a sign-in of theirs, the agent gets the sign-in link.
    for user, token in (
        ("kim", org.id_token("kim", [LOGIN_CLIENT, "another-client"], email="kim")),  # azp missing
        ("lee", org.id_token("someone-else", LOGIN_CLIENT, email="lee")),  # sub is not lee's sign-in
    ):
        status, answer = await call(user, token)
        assert (status, answer["error"]["code"]) == (200, -32042), answer
    assert org.exchanges[("kim", one)] == org.exchanges[("someone-else", one)] == 0
