"""The OAuth connect journey end to end: the official MCP SDK client, a real
authorization server (oidc-provider), a real protected MCP server, the proxy,
and Debian's Chromium in between."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from mcp.shared.exceptions import MCPError
from peers.browser import complete_login_and_consent, new_page
from peers.mcp_client import INITIALIZE, raw_post, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import AuthorizationServer, run_authorization_server
from playwright.async_api import Browser
from support import ProxyProcess, free_port

from proxy.crypto import Keyring
from proxy.settings import load_settings
from proxy.stores import open_token_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthorizationServer]:
    with run_authorization_server() as server:
        yield server


@pytest.fixture(scope="module")
def resource(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(auth.issuer) as server:
        yield server


def start_proxy(tmp_path: Path, salt: str, server: dict[str, Any], **settings: Any) -> ProxyProcess:
    port = free_port()
    config = {"oauth_allow_http_loopback": True, "servers": {"notes": server}, **settings}
    return ProxyProcess(config, tmp_path, {"KEYBEARER_SALT": salt}, port=port)


async def elicitation(proxy: ProxyProcess, user: str = "alice") -> tuple[str, str]:
    """What the agent sees: the -32042 error's link and text, via the SDK client."""
    error = (await _agent_error(f"{proxy.url}/{user}/notes")).error
    assert error.code == -32042
    (item,) = error.data["elicitations"]
    assert item["mode"] == "url" and item["elicitationId"]
    assert item["url"] in error.message  # for clients that only show text
    return item["url"], error.message


async def _agent_error(url: str) -> MCPError:
    """The MCPError the SDK client raises (it arrives wrapped in task-group exception groups)."""
    try:
        async with streamable_session(url):
            pass
    except BaseException as exc:
        found = _find(exc)
        if found is None:
            raise
        return found
    raise AssertionError("the agent's session started without a token")


def _find(exc: BaseException) -> MCPError | None:
    if isinstance(exc, MCPError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find(inner)
        if found is not None:
            return found
    return None


async def connect_in_browser(browser: Browser, link: str, user: str = "alice") -> str:
    async with new_page(browser) as page:
        await page.goto(link)
        body = await page.inner_text("body")
        assert f"Connect notes for {user}" in body and "127.0.0.1" in body
        await page.click("button[type=submit]")
        final = await complete_login_and_consent(page, user)
        text = await page.inner_text("body")
        assert "Connected" in text and "retry" in text, text
        return final


async def whoami(proxy: ProxyProcess, user: str = "alice") -> dict[str, Any]:
    async with streamable_session(f"{proxy.url}/{user}/notes") as session:
        return json.loads(result_text(await session.call_tool("whoami", {})))


@pytest.mark.parametrize("client", ["dynamic", "static", "metadata_document"])
async def test_connect_journey(
    client: str,
    auth: AuthorizationServer,
    resource: ResourceServer,
    browser: Browser,
    tmp_path: Path,
    salt: str,
) -> None:
    if client == "metadata_document":
        # An authorization server that advertises Client ID Metadata Documents.
        with (
            run_authorization_server(cimd={"allow_http_loopback": True}) as cimd_auth,
            run_resource_server(cimd_auth.issuer) as cimd_resource,
        ):
            return await journey(client, cimd_auth, cimd_resource, browser, tmp_path, salt)
    await journey(client, auth, resource, browser, tmp_path, salt)


async def journey(
    client: str,
    auth: AuthorizationServer,
    resource: ResourceServer,
    browser: Browser,
    tmp_path: Path,
    salt: str,
) -> None:
    server: dict[str, Any] = {"url": resource.mcp_url, "auth": "oauth"}
    proxy_port = free_port()
    callback = f"http://127.0.0.1:{proxy_port}/oauth/callback"
    if client == "static":
        auth.add_client({
            "client_id": f"kb-static-{proxy_port}", "client_secret": "kb-static-secret-0123456789abcdef",
            "redirect_uris": [callback], "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"], "token_endpoint_auth_method": "client_secret_basic",
        })  # fmt: skip
        server.update(client_id=f"kb-static-{proxy_port}", client_secret_env="NOTES_CLIENT_SECRET")
    auth.reset_stats()
    proxy = ProxyProcess(
        {"oauth_allow_http_loopback": True, "servers": {"notes": server}},
        tmp_path, {"KEYBEARER_SALT": salt, "NOTES_CLIENT_SECRET": "kb-static-secret-0123456789abcdef"},
        port=proxy_port,
    )  # fmt: skip
    try:
        link, _ = await elicitation(proxy)
        await connect_in_browser(browser, link)
        me = await whoami(proxy)
        assert me["sub"] == "alice"
        assert me["aud"] == resource.resource or resource.resource in me["aud"]

        stats = auth.stats()
        (code_request,) = [t for t in stats["token_log"] if t["grant_type"] == "authorization_code"]
        assert code_request["resource"] == resource.resource and code_request["has_code_verifier"]
        expected_client = {
            "static": f"kb-static-{proxy_port}",
            "metadata_document": f"{proxy.url}/oauth/client-metadata.json",
        }.get(client)
        if expected_client:
            assert code_request["client_id"] == expected_client
        assert stats["registrations"] == (1 if client == "dynamic" else 0)
        authorize = (
            parse_qs(stats["authorization_log"][-1])
            if isinstance(stats["authorization_log"][-1], str)
            else stats["authorization_log"][-1]
        )
        assert _first(authorize, "code_challenge_method") == "S256"
        assert _first(authorize, "resource") == resource.resource

        # Tokens are stored sealed: no token appears in the store, nor in the log.
        settings = load_settings(str(proxy.config_path), env={"KEYBEARER_SALT": salt})
        tokens = open_token_store(settings)
        await tokens.open()
        try:
            conn = await tokens.get_connection("alice", "notes")
        finally:
            await tokens.close()
        assert conn is not None and conn.state == "connected" and conn.issuer == auth.issuer
        assert conn.sealed and conn.sealed.startswith("kb1.")
        assert Keyring(salt).decrypt("oauth_token", conn.sealed, "oauth_token:alice:notes")
        db = Path(settings.database_url.removeprefix("sqlite:///")).read_bytes()
        assert b"eyJ" not in db  # no JWT in clear
        assert "eyJ" not in proxy.log()

        if client == "dynamic":
            # The registration is reused for the next user.
            link, _ = await elicitation(proxy, "bob")
            await connect_in_browser(browser, link, "bob")
            assert (await whoami(proxy, "bob"))["sub"] == "bob"
            assert auth.stats()["registrations"] == 1
    finally:
        proxy.stop()


def _first(params: Any, name: str) -> Any:
    value = params.get(name)
    return value[0] if isinstance(value, list) else value


@pytest.fixture
def proxy(resource: ResourceServer, tmp_path: Path, salt: str) -> Iterator[ProxyProcess]:
    proc = start_proxy(tmp_path, salt, {"url": resource.mcp_url, "auth": "oauth"})
    yield proc
    proc.stop()


async def test_state_replay_refused(proxy: ProxyProcess, browser: Browser) -> None:
    link, _ = await elicitation(proxy)
    async with new_page(browser) as page:
        await page.goto(link)
        await page.click("button[type=submit]")
        callback = await complete_login_and_consent(page, "alice")
        assert "Connected" in await page.inner_text("body")
        version = await _version(proxy, salt_of(proxy))
        # the same callback again, in the same browser: the state is spent
        answer = await page.goto(callback)
        assert answer is not None and answer.status == 400
        assert "already used or expired" in (
            await page.inner_text("body")
        ).lower() or "already" in await page.inner_text("body")
    assert await _version(proxy, salt_of(proxy)) == version  # nothing stored changed


async def test_state_from_another_browser_refused(proxy: ProxyProcess, browser: Browser) -> None:
    link, _ = await elicitation(proxy)
    async with new_page(browser) as page:
        authorize: list[str] = []
        page.on(
            "request",
            lambda r: authorize.append(r.url) if "/auth?" in r.url or "response_type=code" in r.url else None,
        )
        await page.goto(link)
        await page.click("button[type=submit]")
        await page.wait_for_load_state()
        state = parse_qs(urlsplit(authorize[0]).query)["state"][0]
        async with new_page(browser) as other:
            answer = await other.goto(f"{proxy.url}/oauth/callback?state={state}&code=anything")
            assert answer is not None and answer.status == 403
            assert (
                "another browser" in (await other.inner_text("body")).lower()
                or "different browser" in (await other.inner_text("body")).lower()
            )
        assert await _version(proxy, salt_of(proxy)) is None
        # Whoever saw the URL could not burn the state: the person who began it finishes.
        await complete_login_and_consent(page, "alice")
        assert "Connected" in await page.inner_text("body")


async def test_callback_without_iss_refused(proxy: ProxyProcess, browser: Browser) -> None:
    link, _ = await elicitation(proxy)
    async with new_page(browser) as page:
        authorize: list[str] = []
        page.on("request", lambda r: authorize.append(r.url) if "response_type=code" in r.url else None)
        await page.goto(link)
        await page.click("button[type=submit]")
        await page.wait_for_load_state()
        state = parse_qs(urlsplit(authorize[0]).query)["state"][0]
        # same browser, the AS advertises `iss` but the response has none
        answer = await page.goto(f"{proxy.url}/oauth/callback?state={state}&code=anything")
        assert answer is not None and answer.status == 400
        assert "no iss" in await page.inner_text("body")
    assert await _version(proxy, salt_of(proxy)) is None


async def test_access_denied_shown_plainly(proxy: ProxyProcess, browser: Browser) -> None:
    link, _ = await elicitation(proxy)
    async with new_page(browser) as page:
        await page.goto(link)
        await page.click("button[type=submit]")
        await complete_login_and_consent(page, "alice", consent=False)
        text = await page.inner_text("body")
        assert "access_denied" in text and "Nothing was changed" in text
    assert await _version(proxy, salt_of(proxy)) is None


async def test_bad_links_refused(proxy: ProxyProcess) -> None:
    link, _ = await elicitation(proxy)
    async with httpx.AsyncClient() as client:
        tampered = link.replace("/alice/", "/mallory/")
        assert (await client.get(tampered)).status_code == 403
        expired = link.replace("expires=", "expires=1")  # changes the signed expiry
        assert (await client.get(expired)).status_code == 403
        # Continue without the page's cookie and CSRF token
        assert (await client.post(link, data={"csrf": "x"})).status_code == 403
        page = await client.get(link)
        assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert "kb_browser" in page.headers["set-cookie"] and "HttpOnly" in page.headers["set-cookie"]
        forged = await client.post(link, data={"csrf": "forged"})
        assert forged.status_code == 403


async def test_non_rpc_request_gets_403_with_link_never_401(proxy: ProxyProcess) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{proxy.url}/alice/notes", headers={"Accept": "text/event-stream"})
    assert answer.status_code == 403 and "www-authenticate" not in answer.headers
    assert answer.json()["connect_url"].startswith(f"{proxy.url}/connect/alice/notes?")
    raw = await raw_post(f"{proxy.url}/alice/notes", INITIALIZE)
    assert raw.status_code == 200 and raw.json()["error"]["code"] == -32042


async def test_client_metadata_document_served(proxy: ProxyProcess) -> None:
    async with httpx.AsyncClient() as client:
        doc = (await client.get(f"{proxy.url}/oauth/client-metadata.json")).json()
    assert doc["client_id"] == f"{proxy.url}/oauth/client-metadata.json"
    assert doc["redirect_uris"] == [f"{proxy.url}/oauth/callback"]
    assert set(doc["grant_types"]) == {"authorization_code", "refresh_token"}


def salt_of(proxy: ProxyProcess) -> str:
    return proxy.env["KEYBEARER_SALT"]


async def _version(proxy: ProxyProcess, salt: str) -> int | None:
    settings = load_settings(str(proxy.config_path), env={"KEYBEARER_SALT": salt})
    tokens = open_token_store(settings)
    await tokens.open()
    try:
        conn = await tokens.get_connection("alice", "notes")
    finally:
        await tokens.close()
    return conn.version if conn else None
