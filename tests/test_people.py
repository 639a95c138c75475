"""People's side, end to end in Chromium: signing in with the organisation's
OpenID Connect provider (oidc-provider, which is also the MCP server's
authorization server here), the home page of one's connections, links for
someone else refused, the operator console, sessions shared by replicas, and
the deployments without sign-in. Every page a person can land on is
screenshotted into docs/screenshots/.

The ID token checks run against a small provider of the test's own (a real
loopback HTTP server) that signs whatever token a case needs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis.asyncio as redis
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from peers.browser import complete_login_and_consent, new_context
from peers.mcp_client import INITIALIZE, raw_post, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import AuthorizationServer, run_authorization_server
from playwright.async_api import Browser, BrowserContext, Page
from services import REDIS_URL
from support import ROOT, ProxyProcess, free_port

from proxy import links
from proxy.crypto import Keyring
from proxy.settings import ConfigError, load_settings
from proxy.stores import open_token_store

pytestmark = pytest.mark.slow

SHOTS = ROOT / "docs" / "screenshots"
PHONE = {"width": 420, "height": 860}
DESK = {"width": 1100, "height": 760}
ADMIN = "people-admin-token-0123456789abcdef"
ADMINS = "keybearer-admins"


@pytest.fixture(scope="module")
def idp() -> Iterator[AuthorizationServer]:
    claims = {"alice": {"name": "Alice Liddell"}, "carol": {"name": "Carol Operator", "groups": ["staff", ADMINS]},
              "bob": {"groups": ["staff"]}}  # fmt: skip
    with run_authorization_server(account_claims=claims) as server:
        yield server


@pytest.fixture(scope="module")
def resource(idp: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(idp.issuer) as server:
        yield server


def sign_in_settings(
    idp: AuthorizationServer, port: int, folder: Path
) -> tuple[dict[str, Any], dict[str, str]]:
    """A client registered at the provider for the proxy on `port`; its secret in a file (the _FILE twin)."""
    client_id, secret = f"kb-login-{port}", secrets.token_urlsafe(24)
    idp.add_client({
        "client_id": client_id, "client_secret": secret, "redirect_uris": [f"http://127.0.0.1:{port}/login/callback"],
        "grant_types": ["authorization_code"], "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
    })  # fmt: skip
    secret_file = folder / f"login-secret-{port}"
    secret_file.write_text(secret + "\n")
    settings = {"login_issuer": idp.issuer, "login_client_id": client_id, "login_scopes": "openid profile email groups",
                "login_admin_claim": "groups", "login_admin_values": [ADMINS]}  # fmt: skip
    return settings, {"KEYBEARER_LOGIN_CLIENT_SECRET_FILE": str(secret_file)}


@pytest.fixture(scope="module")
def people(
    idp: AuthorizationServer, resource: ResourceServer, tmp_path_factory: pytest.TempPathFactory, salt: str
) -> Iterator[ProxyProcess]:
    """A proxy where people sign in; `notes` and `wiki` are OAuth servers, `keyed` an API-key one."""
    port, folder = free_port(), tmp_path_factory.mktemp("people")
    settings, env = sign_in_settings(idp, port, folder)
    servers = {"notes": {"url": resource.mcp_url, "auth": "oauth"}, "wiki": {"url": resource.mcp_url, "auth": "oauth"},
               "keyed": {"url": "http://127.0.0.1:9/mcp", "auth": "api_key"}}  # fmt: skip
    config = {"oauth_allow_http_loopback": True, "admin_token": ADMIN, "servers": servers, **settings}
    proc = ProxyProcess(config, folder, {"KEYBEARER_SALT": salt, **env}, port=port)
    yield proc
    proc.stop()
    assert env["KEYBEARER_LOGIN_CLIENT_SECRET_FILE"] and "kb1." not in proc.log()


async def shoot(page: Page, name: str) -> None:
    """The page as a person sees it, for docs/screenshots/, and proof it needs no sideways scrolling."""
    SHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=SHOTS / f"{name}.png", full_page=True)
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), name


@contextlib.asynccontextmanager
async def signed_in(
    browser: Browser, proxy: ProxyProcess, user: str, viewport: dict[str, int] = PHONE
) -> AsyncIterator[Page]:
    """A fresh browser that opened the proxy, was sent to the provider, signed in as `user` and came home."""
    async with new_context(browser, viewport=viewport) as context:
        page = await context.new_page()
        await page.goto(f"{proxy.url}/")
        await complete_login_and_consent(page, user)
        assert page.url == f"{proxy.url}/", page.url
        yield page


def row(page: Page, server: str) -> Any:
    return page.locator("tr", has=page.locator(f"strong:text-is('{server}')"))


async def connect_from_home(page: Page, user: str, server: str) -> None:
    await row(page, server).get_by_role("link", name="Connect").click()
    await page.get_by_role("button", name="Continue").click()
    await complete_login_and_consent(page, user)
    assert "Connected" in await page.inner_text("h1")


async def session_cookie(context: BrowserContext) -> dict[str, Any]:
    (cookie,) = [c for c in await context.cookies() if c["name"] == "kb_session"]
    return dict(cookie)


async def stored_version(proxy: ProxyProcess, user: str, server: str) -> int | None:
    settings = load_settings(str(proxy.config_path), env={"KEYBEARER_SALT": proxy.env["KEYBEARER_SALT"]})
    tokens = open_token_store(settings)
    await tokens.open()
    try:
        conn = await tokens.get_connection(user, server)
    finally:
        await tokens.close()
    return conn.version if conn else None


def pending_count(proxy: ProxyProcess) -> int:
    with contextlib.closing(sqlite3.connect(proxy.config["database_url"].removeprefix("sqlite:///"))) as db:
        return int(db.execute("SELECT count(*) FROM pending").fetchone()[0])


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "named", "says"),
    [
        ({"login_issuer": "https://sso.example.com"}, "login_client_id", "redirect URI"),
        ({"login_client_id": "kb"}, "login_issuer", "set both, or neither"),
        ({"login_issuer": "https://sso.example.com", "login_client_id": "kb", "login_admin_claim": "groups"},
         "login_admin_values", "go together"),
        ({"login_issuer": "https://sso.example.com", "login_client_id": "kb", "login_scopes": "profile email"},
         "login_scopes", "include openid"),
        ({"login_issuer": "https://sso.example.com", "login_client_id": "kb", "browser_identity_header": "X-User"},
         "browser_identity_header", "remove browser_identity_header"),
        ({"login_issuer": "sso.example.com", "login_client_id": "kb"}, "login_issuer", "issuer URL"),
        ({"login_issuer": "https://sso.example.com", "login_client_id": "kb", "login_user_claim": "a claim"},
         "login_user_claim", "claim name"),
    ],
)  # fmt: skip
def test_sign_in_settings_are_checked(
    settings: dict[str, Any], named: str, says: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as refused:
        load_settings(str(config), env={})
    assert refused.value.key == named and says in str(refused.value)


def test_the_issuer_is_kept_exactly_and_the_secret_read_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret-from-a-file\n")
    env = {"KEYBEARER_LOGIN_ISSUER": "https://tenant.example.com/", "KEYBEARER_LOGIN_CLIENT_ID": "kb",
           "KEYBEARER_LOGIN_CLIENT_SECRET_FILE": str(tmp_path / "secret"),
           "KEYBEARER_LOGIN_ADMIN_VALUES": "ops,admins", "KEYBEARER_LOGIN_ADMIN_CLAIM": "groups"}  # fmt: skip
    settings = load_settings(env=env)
    assert settings.login_issuer == "https://tenant.example.com/" and settings.signs_in
    assert settings.login_client_secret == "s3cret-from-a-file"
    assert (
        settings.login_admin_values == ("ops", "admins") and settings.login_scopes == "openid profile email"
    )


# -- signing in --------------------------------------------------------------------------


async def test_sign_in_connect_disconnect_sign_out(
    people: ProxyProcess, browser: Browser, idp: AuthorizationServer
) -> None:
    async with new_context(browser, viewport=PHONE) as context:
        page = await context.new_page()
        await page.goto(f"{people.url}/")
        assert page.url.startswith(idp.issuer)  # sent to the organisation's sign-in
        await complete_login_and_consent(page, "alice")
        assert page.url == f"{people.url}/"
        text = await page.inner_text("body")
        assert (
            "Your connections" in text
            and "Signed in as Alice Liddell" in text
            and "Operator console" not in text
        )
        assert "not connected" in await row(page, "notes").inner_text()
        cookie = await session_cookie(context)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["value"].startswith("kb1.")

        # Connect from home: the connect page, the server's provider, back to "Connected".
        await row(page, "notes").get_by_role("link", name="Connect").click()
        assert "Connect notes for alice" in await page.inner_text("h1")
        await shoot(page, "connect")
        await page.get_by_role("button", name="Continue").click()
        await complete_login_and_consent(page, "alice")
        assert "Connected" in await page.inner_text("h1")
        await shoot(page, "connected")
        await page.get_by_role("link", name="See your connections").click()
        assert page.url == f"{people.url}/" and "connected" in await row(page, "notes").inner_text()
        await shoot(page, "home")

        async with streamable_session(f"{people.url}/alice/notes") as session:
            assert json.loads(result_text(await session.call_tool("whoami", {})))["sub"] == "alice"
        # Another person's agent is told where their connections are: the home page.
        message = (await raw_post(f"{people.url}/dave/notes", INITIALIZE)).json()["error"]["message"]
        assert f"all your connections: {people.url}/" in message

        await row(page, "notes").get_by_role("button", name="Disconnect").click()
        assert page.url == f"{people.url}/" and "not connected" in await row(page, "notes").inner_text()
        assert await stored_version(people, "alice", "notes") is None

        forced = await page.request.post(f"{people.url}/logout", form={"csrf": "from another site"})
        assert forced.status == 403 and (await page.request.get(f"{people.url}/")).status == 200
        await page.get_by_role("button", name="Sign out").click()
        assert "You are signed out" in await page.inner_text("body")
        await shoot(page, "signed-out")
        assert [c for c in await context.cookies() if c["name"] == "kb_session"] == []
        # The session ended in the store, not only in this browser: its cookie opens nothing.
        await context.add_cookies([cookie])  # type: ignore[list-item]
        answer = await page.goto(f"{people.url}/")
        assert answer is not None and answer.status == 401
        assert "Your session has ended" in await page.inner_text("body")
        await shoot(page, "session-ended")
        assert [c for c in await context.cookies() if c["name"] == "kb_session"] == []


async def test_a_link_for_someone_else_is_refused(
    people: ProxyProcess, browser: Browser, idp: AuthorizationServer, salt: str
) -> None:
    keyring = Keyring(salt)
    connect = links.connect_url(people.url, keyring, "alice", "notes", 600)
    connections = links.connections_url(people.url, keyring, "alice", 600)
    before = await stored_version(people, "alice", "notes")
    async with signed_in(browser, people, "bob") as page:
        authorizations, pending = (await idp.astats())["authorization_requests"], pending_count(people)
        answer = await page.goto(connect)
        assert answer is not None and answer.status == 403
        text = await page.inner_text("body")
        assert (
            "This link is for alice" in text and "signed in as bob" in text and "Nothing was changed" in text
        )
        await shoot(page, "link-for-someone-else")
        for method, url in (("post", connect), ("get", connections),
                            ("post", f"{people.url}/connections/alice/notes/disconnect")):  # fmt: skip
            refused = await getattr(page.request, method)(
                url, form={"csrf": "x"} if method == "post" else None
            )
            assert refused.status == 403 and "This link is for alice" in await refused.text(), url
        assert (await idp.astats())["authorization_requests"] == authorizations
        assert pending_count(people) == pending
    assert await stored_version(people, "alice", "notes") == before


# -- the operator console ----------------------------------------------------------------


async def test_console_for_operators_only_and_a_reset_disconnects_its_users(
    people: ProxyProcess, browser: Browser
) -> None:
    async with signed_in(browser, people, "frank") as frank:
        await connect_from_home(frank, "frank", "notes")
    assert await stored_version(people, "frank", "notes") is not None

    console = f"{people.url}/admin/console"
    async with signed_in(browser, people, "bob") as bob:
        answer = await bob.goto(console)
        assert answer is not None and answer.status == 403
        assert "Not an operator" in await bob.inner_text("body")
        await shoot(bob, "not-an-operator")
        refused = await bob.request.post(f"{console}/servers/notes/reset", form={"csrf": "x"})
        assert refused.status == 403
    assert await stored_version(people, "frank", "notes") is not None

    async with signed_in(browser, people, "carol", DESK) as carol:
        await carol.get_by_role("link", name="Operator console").click()
        listing = await carol.inner_text("body")
        assert "notes" in listing and "no API key is set" in listing
        assert await row(carol, "notes").locator("td[data-label='Connected users']").inner_text() == "1"
        await shoot(carol, "console")
        await carol.get_by_role("link", name="notes").click()
        assert "frank" in await carol.inner_text("body")
        await shoot(carol, "console-server")

        forged = await carol.request.post(f"{console}/servers/notes/reset", form={"csrf": "forged"})
        assert forged.status == 403 and await stored_version(people, "frank", "notes") is not None
        await carol.get_by_role("button", name="Reset notes").click()
        assert "Reset: 1 connection(s) deleted" in await carol.inner_text("body")

        await api_key_is_write_only(people, carol)
        await static_client_is_set_and_cleared(people, carol)

    async with signed_in(browser, people, "frank") as frank:
        assert "not connected" in await row(frank, "notes").inner_text()
    assert (await raw_post(f"{people.url}/frank/notes", INITIALIZE)).json()["error"]["code"] == -32042


async def admin_api(proxy: ProxyProcess, path: str) -> Any:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        return (await client.get(f"{proxy.url}/admin/servers/{path}")).json()


async def api_key_is_write_only(people: ProxyProcess, carol: Page) -> None:
    key = "sk-console-" + secrets.token_hex(8)
    await carol.goto(f"{people.url}/admin/console/servers/keyed")
    await carol.fill("#api_key", key)
    await carol.get_by_role("button", name="Save key").click()
    text, html = await carol.inner_text("body"), await carol.content()
    assert (
        "API key saved" in text
        and f"Set (stored, encrypted, {len(key)} characters)" in text
        and key not in html
    )
    assert (await admin_api(people, "keyed/api-key"))["source"] == "stored"
    await carol.get_by_role("button", name="Clear the stored key").click()
    assert "The stored API key was deleted" in await carol.inner_text("body")
    assert (await admin_api(people, "keyed/api-key"))["set"] is False


async def static_client_is_set_and_cleared(people: ProxyProcess, carol: Page) -> None:
    await carol.goto(f"{people.url}/admin/console/servers/wiki")
    token = await carol.locator("input[name=csrf]").first.get_attribute("value")
    bad = await carol.request.post(f"{people.url}/admin/console/servers/wiki/oauth-client",
                                   form={"csrf": token or "", "client_id": ""})  # fmt: skip
    assert bad.status == 400 and "client_id" in await bad.text() and "Back to the console" in await bad.text()
    assert (await admin_api(people, "wiki/oauth-client"))["set"] is False
    await carol.fill("#client_id", "console-client")
    await carol.fill("#client_secret", "console-secret-0123456789")
    await carol.get_by_role("button", name="Save client").click()
    text, html = await carol.inner_text("body"), await carol.content()
    assert (
        "Client console-client (client_secret_basic, with a secret)" in text and "console-secret" not in html
    )
    assert (await admin_api(people, "wiki/oauth-client"))["client_secret_set"] is True
    await carol.get_by_role("button", name="Clear", exact=True).click()
    assert (await admin_api(people, "wiki/oauth-client"))["set"] is False


# -- replicas, and deployments without sign-in -------------------------------------------


async def test_two_replicas_share_one_session(
    idp: AuthorizationServer, resource: ResourceServer, browser: Browser, postgres_database: str,
    redis_prefix: str, salt: str, tmp_path: Path,
) -> None:  # fmt: skip
    ports = [free_port(), free_port()]
    settings, env = sign_in_settings(idp, ports[0], tmp_path)
    prefix = f"{redis_prefix}-people"
    config = {
        "public_url": f"http://127.0.0.1:{ports[0]}", "database_url": postgres_database, "redis_url": REDIS_URL,
        "redis_prefix": prefix, "migrate_on_start": True, "oauth_allow_http_loopback": True,
        "servers": {"notes": {"url": resource.mcp_url, "auth": "oauth"}}, **settings,
    }  # fmt: skip
    a = ProxyProcess(config, tmp_path, {"KEYBEARER_SALT": salt, **env}, port=ports[0])
    b = ProxyProcess(config, tmp_path, {"KEYBEARER_SALT": salt, **env}, port=ports[1])
    raw = redis.from_url(REDIS_URL, decode_responses=True)
    try:
        async with new_context(browser) as context:
            page = await context.new_page()
            await page.goto(f"{a.url}/")
            await complete_login_and_consent(page, "grace")
            assert page.url == f"{a.url}/"
            await page.goto(f"{b.url}/")  # the other replica knows the session: no sign-in
            assert page.url == f"{b.url}/" and "Signed in as grace" in await page.inner_text("body")
            (key,) = [k async for k in raw.scan_iter(match=f"{prefix}:session:*")]
            assert 0 < await raw.pttl(key) <= 7200_000 and "grace" not in await raw.get(key)

            cookie = await session_cookie(context)
            await page.goto(f"{b.url}/logout")
            await page.locator("body > form").get_by_role("button", name="Sign out").click()
            assert "You are signed out" in await page.inner_text("body")
            await context.add_cookies([cookie])  # type: ignore[list-item]
            answer = await page.goto(f"{a.url}/")
            assert answer is not None and answer.status == 401  # ended on b, so ended on a
            assert [k async for k in raw.scan_iter(match=f"{prefix}:session:*")] == []
    finally:
        a.stop()
        b.stop()
        await raw.aclose()


async def test_without_sign_in_links_work_and_operators_get_a_console_link(
    resource: ResourceServer, browser: Browser, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory({"oauth_allow_http_loopback": True, "admin_token": ADMIN,
                           "servers": {"notes": {"url": resource.mcp_url, "auth": "oauth"}}})  # fmt: skip
    async with new_context(browser, viewport=PHONE) as context:
        page = await context.new_page()
        answer = await page.goto(f"{proxy.url}/")
        assert (
            answer is not None and answer.status == 200 and "keybearer link" in await page.inner_text("body")
        )
        await shoot(page, "welcome")
        answer = await page.goto(f"{proxy.url}/login")
        assert (
            answer is not None and answer.status == 404 and "No sign-in here" in await page.inner_text("body")
        )

        printed = proxy.cli("link", "alice", "notes")
        assert printed.returncode == 0, printed.stderr
        found = dict(line.split(": ", 1) for line in printed.stdout.splitlines() if ": http" in line)
        await page.goto(found["connections of alice"])
        assert "Connections of alice" in await page.inner_text("h1")
        assert "not connected" in await row(page, "notes").inner_text()
        await shoot(page, "connections-link")
        await page.goto(found["connect notes"])
        assert "Connect notes for alice" in await page.inner_text("h1")

        async with httpx.AsyncClient(base_url=proxy.url) as rebinding:  # a page that rebound its own name
            for path in ("/", "/login", "/logout", "/connections/alice", "/admin/console"):
                answer = await rebinding.get(path, headers={"Host": "evil.example"})
                assert answer.status_code == 403 and "evil.example" in answer.text, path
        async with httpx.AsyncClient(
            base_url=proxy.url, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as admin:
            made = await admin.post("/admin/links", json={"user": "alice", "server": "notes"})
            assert made.status_code == 200 and made.headers["cache-control"] == "no-store"
            assert (await admin.get(made.json()["connect_url"])).status_code == 200
            assert (
                await admin.post("/admin/links", json={"user": "alice", "server": "nope"})
            ).status_code == 404
            assert (await admin.post("/admin/links", json={"user": "connect"})).status_code == 400
            assert (await admin.post("/admin/links", json={"console": 1})).status_code == 400

        answer = await page.goto(f"{proxy.url}/admin/console")
        assert answer is not None and answer.status == 401
        assert "keybearer link --admin" in await page.inner_text("body")
        await shoot(page, "console-link-needed")
        printed = proxy.cli("link", "--admin")
        assert printed.returncode == 0, printed.stderr
        console_url = printed.stdout.split("operator console: ", 1)[1].split()[0]
        answer = await page.goto(console_url.replace("sig=", "sig=A"))
        assert answer is not None and answer.status == 403
        await page.goto(console_url)
        assert page.url == f"{proxy.url}/admin/console"  # the link is out of the address bar
        assert "notes" in await page.inner_text(
            "body"
        ) and "operator (console link)" in await page.inner_text("nav")


async def test_sign_in_problems_each_have_a_page(
    people: ProxyProcess, browser: Browser, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    async with new_context(browser, viewport=PHONE) as context:
        page = await context.new_page()
        await page.goto(f"{people.url}/")
        await complete_login_and_consent(page, "henry", consent=False)
        text = await page.inner_text("body")
        assert "Access denied" in text and "access_denied" in text and "Try again" in text
        await shoot(page, "access-denied")
        assert [c for c in await context.cookies() if c["name"] == "kb_session"] == []

    down = proxy_factory({"login_issuer": f"http://127.0.0.1:{free_port()}", "login_client_id": "kb",
                          "oauth_allow_http_loopback": True})  # fmt: skip
    async with new_context(browser, viewport=PHONE) as context:
        page = await context.new_page()
        answer = await page.goto(f"{down.url}/connections/alice")
        assert answer is not None and answer.status == 503 and answer.headers["retry-after"]
        assert "Sign-in is unavailable" in await page.inner_text("body")
        await shoot(page, "sign-in-unavailable")
    assert "identity provider unusable" in down.log() and "could not be reached" in down.log()


# -- the ID token, checked ---------------------------------------------------------------


class Provider:
    """A loopback OpenID provider that answers the token request with whatever ID token a case made."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.impostor = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.id_token = ""
        self.token_requests: list[tuple[dict[str, str], str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}/tenant"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/tenant/.well-known/openid-configuration":
                    i = provider.issuer
                    self._json({"issuer": i, "authorization_endpoint": f"{i}/auth", "token_endpoint": f"{i}/token",
                                "jwks_uri": f"{i}/jwks", "code_challenge_methods_supported": ["S256"]})  # fmt: skip
                elif self.path == "/tenant/jwks":
                    self._json({"keys": [provider.key.as_dict(private=False)]})
                else:
                    self._json({"error": "not_found"}, 404)

            def do_POST(self) -> None:
                form = {
                    k: v[0]
                    for k, v in parse_qs(
                        self.rfile.read(int(self.headers["content-length"])).decode()
                    ).items()
                }
                provider.token_requests.append((form, self.headers.get("authorization", "")))
                self._json({"access_token": "at", "token_type": "Bearer", "id_token": provider.id_token})

            def _json(self, payload: Any, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    p = Provider()
    thread = threading.Thread(target=p.server.serve_forever, daemon=True)
    thread.start()
    yield p
    p.server.shutdown()
    p.server.server_close()


CLIENT, SECRET = "kb-client", "client-secret-0123456789abcdefghijklmnop"
IDLE, LIFETIME = 2, 5


@pytest.fixture(scope="module")
def checked(
    provider: Provider, tmp_path_factory: pytest.TempPathFactory, salt: str
) -> Iterator[ProxyProcess]:
    config = {"login_issuer": provider.issuer, "login_client_id": CLIENT, "oauth_allow_http_loopback": True,
              "session_idle_timeout": IDLE, "session_lifetime": LIFETIME}  # fmt: skip
    env = {"KEYBEARER_SALT": salt, "KEYBEARER_LOGIN_CLIENT_SECRET": SECRET}
    proc = ProxyProcess(config, tmp_path_factory.mktemp("checked"), env)
    yield proc
    proc.stop()


def _unsigned(claims: dict[str, Any]) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


CASES: dict[str, Callable[[Provider, dict[str, Any]], str]] = {
    "valid": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, c, p.key),
    "another issuer": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {**c, "iss": "http://other"}, p.key),
    "another audience": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {**c, "aud": "other"}, p.key),
    "several audiences, no azp": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {**c, "aud": [CLIENT, "x"]}, p.key),
    "expired": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {**c, "exp": c["iat"] - 600}, p.key),
    "another nonce": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {**c, "nonce": "other"}, p.key),
    "no nonce": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {k: v for k, v in c.items() if k != "nonce"}, p.key),
    "signed by another key": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, c, p.impostor),
    "signed with the client secret": lambda p, c: jwt.encode({"alg": "HS256"}, c, OctKey.import_key(SECRET)),
    "unsigned": lambda p, c: _unsigned(c),
    "a user id the proxy cannot use": lambda p, c: jwt.encode({"alg": "RS256", "kid": "k1"}, {**c, "sub": "a b"}, p.key),
}  # fmt: skip


async def sign_in_with(
    client: httpx.AsyncClient, provider: Provider, case: str, next_path: str = "/"
) -> tuple[httpx.Response, dict[str, str]]:
    """/login, the provider answering with the case's ID token, the callback: its answer, what was sent."""
    start = await client.get("/login", params={"next": next_path})
    assert start.status_code == 303
    sent = {k: v[0] for k, v in parse_qs(urlsplit(start.headers["location"]).query).items()}
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": CLIENT, "sub": "ivan", "iat": now, "exp": now + 300,
              "nonce": sent["nonce"]}  # fmt: skip
    provider.id_token = CASES[case](provider, claims)
    return await client.get("/login/callback", params={"code": "c", "state": sent["state"]}), sent


@pytest.mark.parametrize("case", list(CASES))
async def test_the_id_token_is_verified(case: str, provider: Provider, checked: ProxyProcess) -> None:
    async with httpx.AsyncClient(base_url=checked.url) as browser_like:
        answer, sent = await sign_in_with(browser_like, provider, case, "/connections/ivan")
        assert sent["code_challenge_method"] == "S256" and sent["scope"] == "openid profile email"
        form, authorization = provider.token_requests[-1]
        challenge = base64.urlsafe_b64encode(hashlib.sha256(form["code_verifier"].encode()).digest()).rstrip(
            b"="
        )
        assert challenge.decode() == sent["code_challenge"]
        assert form["redirect_uri"] == f"{checked.url}/login/callback"
        assert authorization.startswith("Basic ") and SECRET not in json.dumps(form)
        if case == "valid":
            assert answer.status_code == 303 and answer.headers["location"] == "/connections/ivan"
            assert "kb_session=" in answer.headers["set-cookie"]
            # the state is spent: the same answer again signs nobody in
            again = await browser_like.get("/login/callback", params={"code": "c", "state": sent["state"]})
            assert again.status_code == 400 and "already completed" in again.text
            return
        assert answer.status_code == 403 and "kb_session=" not in answer.headers.get("set-cookie", "")
        expected = (
            "Account not usable here" if case == "a user id the proxy cannot use" else "could not be verified"
        )
        assert expected in answer.text
    assert SECRET not in checked.log()


async def test_a_sign_in_goes_back_only_to_this_proxy_and_this_browser(
    provider: Provider, checked: ProxyProcess
) -> None:
    async with (
        httpx.AsyncClient(base_url=checked.url) as started,
        httpx.AsyncClient(base_url=checked.url) as other,
    ):
        for next_path in ("//evil.example/", "/\\evil.example", "/login/callback", "https://evil.example/"):
            answer, _ = await sign_in_with(started, provider, "valid", next_path)
            assert answer.status_code == 303 and answer.headers["location"] == "/", next_path
        location = (await started.get("/login")).headers["location"]
        state = parse_qs(urlsplit(location).query)["state"][0]
        answer = await other.get("/login/callback", params={"code": "c", "state": state})
        assert answer.status_code == 400 and "another browser" in answer.text
        # refused before the state was spent: the browser that began can still finish
        provider.id_token = ""
        answer = await started.get("/login/callback", params={"code": "c", "state": state})
        assert answer.status_code == 502 and "without an ID token" in answer.text


async def test_a_session_ends_when_unused_and_at_its_lifetime_used_or_not(
    provider: Provider, checked: ProxyProcess
) -> None:
    async with (
        httpx.AsyncClient(base_url=checked.url) as used,
        httpx.AsyncClient(base_url=checked.url) as idle,
    ):
        assert (await sign_in_with(used, provider, "valid"))[0].status_code == 303
        assert (await sign_in_with(idle, provider, "valid"))[0].status_code == 303
        kept = used.cookies["kb_session"]
        started = time.monotonic()
        # Used for longer than the idle timeout, but checked well before the lifetime, when
        # the browser forgets the cookie.
        while time.monotonic() - started < IDLE + 1:
            assert (await used.get("/")).status_code == 200
            await asyncio.sleep(0.4)
        ended = await idle.get("/")
        assert ended.status_code == 401 and "Your session has ended" in ended.text
        assert "kb_session=;" in ended.headers["set-cookie"] and "Max-Age=0" in ended.headers["set-cookie"]
        await asyncio.sleep(max(0.0, LIFETIME + 0.5 - (time.monotonic() - started)))
        # The browser forgets the cookie at the lifetime; one kept past it opens nothing either.
        assert (await used.get("/")).headers["location"].startswith("/login")
        ended = await used.get("/", headers={"Cookie": f"kb_session={kept}"})
        assert ended.status_code == 401 and "Sign in again" in ended.text
