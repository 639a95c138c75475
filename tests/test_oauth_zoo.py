"""OAuth against authorization servers as they are out there, end to end: the
proxy, a real authorization server (oidc-provider) set up to behave like other
providers, a protected MCP server (the official SDK) and Chromium. Each test
names the provider behaviour it plays."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from peers.mcp_resource_server import run_resource_server
from peers.oauth import run_authorization_server
from playwright.async_api import Browser
from support import ProxyProcess
from test_oauth_flow import connect_in_browser, elicitation, start_proxy, whoami

from proxy import links
from proxy.crypto import Keyring
from proxy.settings import ConfigError, load_settings

ADMIN_TOKEN = secrets.token_urlsafe(32)


def connections(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    """The admin API's connection listing of the server `notes`, by user."""
    answer = httpx.get(
        f"{proxy.url}/admin/servers/notes/connections",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    )
    answer.raise_for_status()
    return {c["user"]: c for c in answer.json()["connections"]}


@pytest.mark.slow
async def test_provider_that_refreshes_only_with_offline_access(
    browser: Browser, tmp_path: Path, salt: str
) -> None:
    """Okta, Auth0, Entra ID: a refresh token only for `offline_access` (granted on consent)."""
    with (
        # The first token lives 2 s, not 4: the test waits for it to be due, not longer.
        run_authorization_server(refresh_tokens="offline_access", access_token_ttl=2) as auth,
        run_resource_server(auth.issuer) as resource,
    ):
        server = {"url": resource.mcp_url, "auth": "oauth"}
        proxy = start_proxy(tmp_path, salt, server, admin_token=ADMIN_TOKEN)
        try:
            link, _ = await elicitation(proxy)
            await connect_in_browser(browser, link)
            (asked,) = auth.stats()["authorization_log"]
            assert asked["scope"].split() == ["mcp:tools", "offline_access"]
            assert asked["prompt"] == "consent"
            (registered,) = auth.events("registration_create.success")
            assert "refresh_token" in registered["grant_types"]
            assert connections(proxy)["alice"]["refreshable"] is True
            auth.settings(access_token_ttl=4)
            # A 2 s token is due for refresh in its last quarter (1.5 s after it was issued).
            await asyncio.sleep(1.7)
            assert (await whoami(proxy))["sub"] == "alice"
            refreshes = [t for t in auth.stats()["token_log"] if t["grant_type"] == "refresh_token"]
            assert refreshes and all(t["status"] == 200 for t in refreshes)
        finally:
            proxy.stop()


@pytest.mark.slow
@pytest.mark.parametrize("rotating", [True, False], ids=["rotating", "non-rotating"])
async def test_refresh_tokens_rotating_or_not(
    browser: Browser, tmp_path: Path, salt: str, rotating: bool
) -> None:
    """Some providers rotate the refresh token on every use, others keep it (and leave it
    out of the refresh answer): both refresh again, with no reuse detected."""
    with (
        # The first token lives 2 s, those the refreshes get 4 s: each is waited for until due.
        run_authorization_server(rotate_refresh_tokens=rotating, access_token_ttl=2) as auth,
        run_resource_server(auth.issuer) as resource,
    ):
        proxy = start_proxy(
            tmp_path, salt, {"url": resource.mcp_url, "auth": "oauth"}, admin_token=ADMIN_TOKEN
        )
        try:
            link, _ = await elicitation(proxy)
            await connect_in_browser(browser, link)
            auth.settings(access_token_ttl=4)
            for lifetime in (2, 4):
                await asyncio.sleep(0.75 * lifetime + 0.2)  # into the token's last quarter: due
                assert (await whoami(proxy))["sub"] == "alice"
            stats = auth.stats()
            refreshes = [t for t in stats["token_log"] if t["grant_type"] == "refresh_token"]
            assert len(refreshes) == 2 and all(t["status"] == 200 for t in refreshes), refreshes
            assert stats["refresh_reuse_detected"] == 0
        finally:
            proxy.stop()


@pytest.mark.slow
async def test_provider_without_refresh_tokens(browser: Browser, tmp_path: Path, salt: str) -> None:
    """No refresh token at all (providers whose tokens simply expire). The token is used until
    it expires, the connection says it will not be refreshed, and only then is the agent sent
    to reconnect."""
    with (
        run_authorization_server(refresh_tokens="never", access_token_ttl=600) as auth,
        run_resource_server(auth.issuer) as resource,
    ):
        server = {"url": resource.mcp_url, "auth": "oauth"}
        # Every token is "due for refresh" at once, and none can be refreshed.
        proxy = start_proxy(tmp_path, salt, server, admin_token=ADMIN_TOKEN, refresh_skew=3600)
        try:
            link, _ = await elicitation(proxy)
            await connect_in_browser(browser, link)
            assert (await whoami(proxy))["sub"] == "alice"
            assert (await whoami(proxy))["sub"] == "alice"
            assert "refresh_token" not in auth.stats()["token_requests"]
            alice = connections(proxy)["alice"]
            assert (alice["state"], alice["refreshable"]) == ("connected", False)
            page = httpx.get(links.connections_url(proxy.url, Keyring(salt), "alice", 600), timeout=5)
            assert page.status_code == 200 and "expires without refresh; reconnect then" in page.text

            # A token that has really expired: now the agent is asked to reconnect.
            auth.settings(access_token_ttl=1)
            link, _ = await elicitation(proxy, "bob")
            await connect_in_browser(browser, link, "bob")
            expires_at = connections(proxy)["bob"]["expires_at"]
            await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.5)
            reconnect, _ = await elicitation(proxy, "bob")
            assert reconnect.startswith(f"{proxy.url}/connect/bob/notes?")
            bob = connections(proxy)["bob"]
            assert (bob["state"], bob["refreshable"]) == ("must_reconnect", False)
            assert "expired" in bob["last_error"]
        finally:
            proxy.stop()


@pytest.fixture
def document_host() -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """An operator's web server: GET /kb/client.json relays the document from `source["url"]`.
    Yields (its URL, the paths requested, source)."""
    requested: list[str] = []
    source: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            if self.path != "/kb/client.json":
                self.send_error(404)
                return
            with urllib.request.urlopen(source["url"], timeout=5) as upstream:
                body = upstream.read()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/kb/client.json", requested, source
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
async def test_client_metadata_document_at_the_operators_url(
    browser: Browser, tmp_path: Path, salt: str, document_host: tuple[str, list[str], dict[str, str]]
) -> None:
    """The authorization server knows the proxy by `client_metadata_url` and fetches it there."""
    document_url, requested, source = document_host
    with (
        run_authorization_server(cimd={"allow_http_loopback": True}) as auth,
        run_resource_server(auth.issuer) as resource,
    ):
        server = {"url": resource.mcp_url, "auth": "oauth"}
        proxy = start_proxy(tmp_path, salt, server, client_metadata_url=document_url)
        try:
            source["url"] = f"{proxy.url}/oauth/client-metadata.json"
            own = httpx.get(source["url"], timeout=5).json()
            assert own["client_id"] == document_url
            assert own["redirect_uris"] == [f"{proxy.url}/oauth/callback"]
            assert set(own["grant_types"]) == {"authorization_code", "refresh_token"}

            link, _ = await elicitation(proxy)
            await connect_in_browser(browser, link)
            assert (await whoami(proxy))["sub"] == "alice"
            stats = auth.stats()
            (code_request,) = [t for t in stats["token_log"] if t["grant_type"] == "authorization_code"]
            assert code_request["client_id"] == document_url
            assert stats["registrations"] == 0
            assert stats["cimd_fetches"] >= 1 and "/kb/client.json" in requested
        finally:
            proxy.stop()


@pytest.mark.parametrize(
    ("value", "loopback_allowed", "problem"),
    [
        ("http://proxy.example.com/client.json", True, "must be an https:// URL"),
        ("http://127.0.0.1:8080/client.json", False, "must be an https:// URL"),
        ("https://proxy.example.com", False, "must name a document by its path"),
        ("https://proxy.example.com/", False, "must name a document by its path"),
        ("https://proxy.example.com/client.json?v=2", False, "no query, fragment or credentials"),
        ("https://proxy.example.com/client.json#x", False, "no query, fragment or credentials"),
        ("https://kb:pw@proxy.example.com/client.json", False, "no query, fragment or credentials"),
        ("https://proxy.example.com/a/../client.json", False, "no . or .. path segments"),
        ("https://proxy.example.com:99999/client.json", False, "is not a valid URL"),
        ("proxy.example.com/client.json", False, "must be an https:// URL"),
    ],
)
def test_client_metadata_url_checked_at_load(value: str, loopback_allowed: bool, problem: str) -> None:
    env = {
        "KEYBEARER_CLIENT_METADATA_URL": value,
        "KEYBEARER_OAUTH_ALLOW_HTTP_LOOPBACK": str(loopback_allowed),
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == "client_metadata_url" and problem in str(info.value)


@pytest.mark.parametrize(
    ("value", "loopback_allowed"),
    [
        ("https://static.example.com/keybearer/client.json", False),
        ("http://127.0.0.1:8080/kb/client.json", True),
        ("http://localhost/client-metadata.json", True),
    ],
)
def test_client_metadata_url_accepted(value: str, loopback_allowed: bool) -> None:
    env = {
        "KEYBEARER_CLIENT_METADATA_URL": value,
        "KEYBEARER_OAUTH_ALLOW_HTTP_LOOPBACK": str(loopback_allowed),
    }
    assert load_settings(env=env).client_metadata_url == value
