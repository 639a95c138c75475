"""The OAuth test peers work on their own, without the proxy.

The authorization server (oidc-provider), the protected MCP resource server and the browser are
what the proxy's OAuth tests stand on; these tests pin down how they behave, so that a failure
there points at the proxy and not at a peer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from peers.browser import (
    CallbackServer,
    callback_server,
    complete_login_and_consent,
    new_page,
)
from peers.mcp_client import jsonrpc, raw_post, result_text, streamable_session
from peers.mcp_resource_server import ResourceServer, run_resource_server
from peers.oauth import (
    STATIC_CONFIDENTIAL,
    STATIC_PUBLIC,
    AuthorizationServer,
    authorization_url,
    pkce_pair,
    register_client,
    run_authorization_server,
    token_request,
)
from playwright.async_api import Browser

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def callback() -> Iterator[CallbackServer]:
    with callback_server() as server:
        yield server


@pytest.fixture(scope="module")
def auth(callback: CallbackServer) -> Iterator[AuthorizationServer]:
    with run_authorization_server(redirect_uris=[callback.url]) as server:
        yield server


@pytest.fixture(scope="module")
def rs(auth: AuthorizationServer) -> Iterator[ResourceServer]:
    with run_resource_server(auth.issuer) as server:
        yield server


@dataclass
class Client:
    client_id: str
    client_secret: str | None = None


@dataclass
class Flow:
    query: dict[str, str]  # what arrived at the redirect URI
    tokens: dict[str, Any]  # the token response
    client: Client
    verifier: str

    @property
    def claims(self) -> dict[str, Any]:
        return jwt.decode(self.tokens["access_token"], options={"verify_signature": False})


async def authorize(
    browser: Browser,
    auth: AuthorizationServer,
    callback: CallbackServer,
    client: Client,
    *,
    username: str,
    resource: str,
    scope: str | None = None,
    extra: dict[str, str] | None = None,
) -> Flow:
    """Authorization code + PKCE + resource through Chromium (login, consent), then the token."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(12)
    url = authorization_url(
        auth,
        client_id=client.client_id,
        redirect_uri=callback.url,
        code_challenge=challenge,
        state=state,
        resource=resource,
        scope=scope,
        extra=extra,
    )
    async with new_page(browser) as page:
        await page.goto(url)
        final = await complete_login_and_consent(page, username)
    assert final.startswith(callback.url + "?"), final
    query = callback.last_query()
    assert query["state"] == state, query
    data = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "redirect_uri": callback.url,
        "code_verifier": verifier,
        "resource": resource,
    }
    r = await asyncio.to_thread(
        token_request, auth, data, client_id=client.client_id, client_secret=client.client_secret
    )
    assert r.status_code == 200, r.text
    return Flow(query, r.json(), client, verifier)


def refresh(auth: AuthorizationServer, flow: Flow, refresh_token: str, resource: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "resource": resource}
    return token_request(auth, data, client_id=flow.client.client_id, client_secret=flow.client.client_secret)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def dcr_client(auth: AuthorizationServer, callback: CallbackServer) -> Client:
    reg = register_client(
        auth,
        {
            "client_name": "keybearer-test",
            "redirect_uris": [callback.url],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        },
    )
    return Client(reg["client_id"], reg["client_secret"])


# --------------------------------------------------------------------------- authorization server


def test_discovery_document(auth: AuthorizationServer) -> None:
    md = auth.metadata()
    assert md["issuer"] == auth.issuer == f"http://127.0.0.1:{auth.port}"
    assert md["code_challenge_methods_supported"] == ["S256"]
    assert md["registration_endpoint"] == auth.endpoint("registration")
    assert md["revocation_endpoint"] == auth.endpoint("revocation")
    assert md["introspection_endpoint"] == auth.endpoint("introspection")
    assert md["token_endpoint"] == auth.endpoint("token")
    assert md["authorization_response_iss_parameter_supported"] is True
    assert set(md["grant_types_supported"]) >= {"authorization_code", "refresh_token"}
    assert md["response_types_supported"] == ["code"]
    assert {"mcp:tools", "admin"} <= set(md["scopes_supported"])
    # The OpenID form of the same document.
    oidc = httpx.get(f"{auth.base_url}/.well-known/openid-configuration", timeout=5).json()
    assert oidc["issuer"] == md["issuer"]


def test_path_issuer_discovery() -> None:
    with run_authorization_server(issuer_path="/tenant", discovery=["oauth"]) as a:
        assert a.issuer == f"http://127.0.0.1:{a.port}/tenant"
        base = a.base_url
        md = httpx.get(f"{base}/.well-known/oauth-authorization-server/tenant", timeout=5).json()
        assert md["issuer"] == a.issuer
        assert md["authorization_endpoint"] == f"{a.issuer}/auth"
        assert md["token_endpoint"] == f"{a.issuer}/token"
        for path in (
            "/.well-known/oauth-authorization-server",
            "/.well-known/openid-configuration/tenant",
            "/tenant/.well-known/openid-configuration",
            "/tenant/.well-known/oauth-authorization-server",
        ):
            assert httpx.get(base + path, timeout=5).status_code == 404, path
        assert a.stats()["discovery_requests"] == {"/.well-known/oauth-authorization-server/tenant": 1}

    with run_authorization_server(issuer_path="/tenant", discovery=["openid-appended"]) as a:
        r = httpx.get(f"{a.base_url}/tenant/.well-known/openid-configuration", timeout=5)
        assert r.json()["issuer"] == a.issuer
        assert httpx.get(f"{a.base_url}/.well-known/oauth-authorization-server/tenant").status_code == 404


async def test_path_issuer_full_flow(browser: Browser, callback: CallbackServer) -> None:
    """Endpoints, login pages and tokens under the issuer path; the RS finds the JWKS through it."""
    with (
        run_authorization_server(issuer_path="/tenant", redirect_uris=[callback.url]) as a,
        run_resource_server(a.issuer) as r,
    ):
        flow = await authorize(
            browser, a, callback, Client(**STATIC_PUBLIC), username="kim", resource=r.resource
        )
        assert flow.query["iss"] == a.issuer
        assert flow.claims["iss"] == a.issuer
        async with streamable_session(r.mcp_url, headers=bearer(flow.tokens["access_token"])) as session:
            assert json.loads(result_text(await session.call_tool("whoami", {})))["sub"] == "kim"


def test_add_client_at_run_time(auth: AuthorizationServer) -> None:
    stored = auth.add_client(
        {
            "client_id": "late-client",
            "client_secret": "late-secret",
            "redirect_uris": ["http://127.0.0.1:8123/oauth/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_basic",
        }
    )
    assert stored["client_id"] == "late-client"
    # Known to the token endpoint: a bad code, not an unknown client.
    r = token_request(
        auth,
        {
            "grant_type": "authorization_code",
            "code": "x",
            "redirect_uri": "http://127.0.0.1:8123/oauth/callback",
            "code_verifier": "x" * 43,
        },
        client_id="late-client",
        client_secret="late-secret",
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    with pytest.raises(RuntimeError):
        auth.add_client({"client_id": "bad", "redirect_uris": ["not a url"]})


def test_dynamic_client_registration(auth: AuthorizationServer, callback: CallbackServer) -> None:
    before = auth.stats()["registrations"]
    reg = register_client(
        auth,
        {
            "client_name": "dcr",
            "redirect_uris": [callback.url],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        },
    )
    assert reg["client_id"] and reg["client_secret"]
    assert reg["grant_types"] == ["authorization_code", "refresh_token"]
    assert reg["redirect_uris"] == [callback.url]
    assert reg["token_endpoint_auth_method"] == "client_secret_basic"
    assert auth.stats()["registrations"] == before + 1


# --------------------------------------------------------------------------- full flow


async def test_authorization_code_flow_to_resource_server(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    client = dcr_client(auth, callback)
    # No scope on the request: the provider grants its default scope.
    flow = await authorize(browser, auth, callback, client, username="alice", resource=rs.resource)
    assert flow.query["iss"] == auth.issuer  # RFC 9207
    assert flow.tokens["token_type"] == "Bearer"
    assert flow.tokens["refresh_token"]
    assert flow.tokens["scope"] == "mcp:tools"

    # A JWT for the resource, signed with a key of the issuer's JWKS.
    access = flow.tokens["access_token"]
    assert jwt.get_unverified_header(access)["typ"] == "at+jwt"
    jwks = jwt.PyJWKClient(auth.endpoint("jwks"))
    claims = jwt.decode(
        access,
        jwks.get_signing_key_from_jwt(access).key,
        algorithms=["RS256"],
        audience=rs.resource,
        issuer=auth.issuer,
    )
    assert claims["sub"] == "alice"
    assert claims["client_id"] == client.client_id
    assert claims["scope"] == "mcp:tools"

    # The resource server accepts it: the official SDK client calls whoami with the header.
    async with streamable_session(rs.mcp_url, headers=bearer(access)) as session:
        me = json.loads(result_text(await session.call_tool("whoami", {})))
        assert me["sub"] == "alice"
        assert me["aud"] == rs.resource
        assert me["scopes"] == ["mcp:tools"]
        assert me["client_id"] == client.client_id
        assert result_text(await session.call_tool("echo", {"text": "hi"})) == "hi"
    stats = await rs.astats()
    assert stats["accepted_by_sub"]["alice"] >= 3
    assert stats["tool_calls"]["whoami"] >= 1

    log = auth.stats()["token_log"][-1]
    assert log["grant_type"] == "authorization_code"
    assert log["resource"] == rs.resource and log["has_code_verifier"] and log["status"] == 200


async def test_second_authorization_in_same_browser_skips_login(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    """The helper copes with a browser that is already logged in and has consented."""
    async with new_page(browser) as page:
        for state in ("first", "second"):
            _, challenge = pkce_pair()
            url = authorization_url(
                auth,
                client_id=STATIC_PUBLIC["client_id"],
                redirect_uri=callback.url,
                code_challenge=challenge,
                state=state,
                resource=rs.resource,
            )
            await page.goto(url)
            await complete_login_and_consent(page, "dave")
            assert callback.last_query()["state"] == state


async def test_consent_denied(browser: Browser, auth: AuthorizationServer, callback: CallbackServer) -> None:
    _, challenge = pkce_pair()
    url = authorization_url(
        auth,
        client_id=STATIC_PUBLIC["client_id"],
        redirect_uri=callback.url,
        code_challenge=challenge,
        state="deny",
        resource="http://127.0.0.1:9/mcp",
    )
    async with new_page(browser) as page:
        await page.goto(url)
        await complete_login_and_consent(page, "erin", consent=False)
    query = callback.last_query()
    assert query["error"] == "access_denied" and query["state"] == "deny"


async def test_refresh_rotation_and_reuse_revokes_grant(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    client = Client(**STATIC_CONFIDENTIAL)
    flow = await authorize(browser, auth, callback, client, username="bob", resource=rs.resource)
    old_refresh = flow.tokens["refresh_token"]
    before = auth.stats()

    r = refresh(auth, flow, old_refresh, rs.resource)
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["refresh_token"] != old_refresh  # rotation
    assert rotated["access_token"] != flow.tokens["access_token"]
    async with streamable_session(rs.mcp_url, headers=bearer(rotated["access_token"])) as session:
        assert json.loads(result_text(await session.call_tool("whoami", {})))["sub"] == "bob"
    mid = auth.stats()
    assert mid["token_requests"]["refresh_token"] == before["token_requests"].get("refresh_token", 0) + 1

    # Reusing the consumed refresh token fails and revokes the whole grant ...
    r = refresh(auth, flow, old_refresh, rs.resource)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    # ... so the new refresh token stops working too.
    r = refresh(auth, flow, rotated["refresh_token"], rs.resource)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"

    after = auth.stats()
    assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"] + 1
    assert after["grants_revoked"] == before["grants_revoked"] + 1
    assert after["token_requests"]["refresh_token"] == mid["token_requests"]["refresh_token"] + 2
    details = [e.get("error_detail") for e in auth.events("grant.error")]
    assert "refresh token already used" in details


async def test_code_replay_revokes_grant(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    flow = await authorize(
        browser, auth, callback, Client(**STATIC_CONFIDENTIAL), username="liam", resource=rs.resource
    )
    before = auth.stats()["code_reuse_detected"]
    data = {
        "grant_type": "authorization_code",
        "code": flow.query["code"],
        "redirect_uri": callback.url,
        "code_verifier": flow.verifier,
        "resource": rs.resource,
    }
    r = token_request(auth, data, **STATIC_CONFIDENTIAL)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert auth.stats()["code_reuse_detected"] == before + 1
    r = refresh(auth, flow, flow.tokens["refresh_token"], rs.resource)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_revocation(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    client = Client(**STATIC_CONFIDENTIAL)
    # The test route: every grant of the account goes.
    flow = await authorize(browser, auth, callback, client, username="carol", resource=rs.resource)
    assert auth.revoke("carol") == 1
    r = refresh(auth, flow, flow.tokens["refresh_token"], rs.resource)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"

    # The standard revocation endpoint (RFC 7009) with the client's credentials.
    flow = await authorize(browser, auth, callback, client, username="carol2", resource=rs.resource)
    r = httpx.post(
        auth.endpoint("revocation"),
        data={"token": flow.tokens["refresh_token"], "token_type_hint": "refresh_token"},
        auth=(client.client_id, client.client_secret or ""),
        timeout=5,
    )
    assert r.status_code == 200, r.text
    r = refresh(auth, flow, flow.tokens["refresh_token"], rs.resource)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_token_endpoint_faults(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    flow = await authorize(
        browser, auth, callback, Client(**STATIC_PUBLIC), username="frank", resource=rs.resource
    )
    auth.settings(faults=[{"route": "token", "grant_type": "refresh_token", "status": 503}])
    try:
        r = refresh(auth, flow, flow.tokens["refresh_token"], rs.resource)
        assert r.status_code == 503
        # The provider never saw it: the refresh token is still good.
        r = refresh(auth, flow, flow.tokens["refresh_token"], rs.resource)
        assert r.status_code == 200, r.text
        latest = r.json()["refresh_token"]
        # Strict mode: a refresh without `resource` is refused before the provider sees it.
        auth.settings(require_resource=True)
        no_resource = {"grant_type": "refresh_token", "refresh_token": latest}
        r = token_request(auth, no_resource, client_id=flow.client.client_id)
        assert r.status_code == 400 and r.json()["error"] == "invalid_target"
        assert refresh(auth, flow, latest, rs.resource).status_code == 200
        assert auth.stats()["token_log"][-2]["resource"] is None
    finally:
        auth.settings(faults=[], require_resource=False)


@pytest.mark.parametrize(
    ("mode", "scope", "prompt", "gets_refresh_token"),
    [
        ("offline_access", "mcp:tools", "consent", False),
        ("offline_access", "mcp:tools offline_access", None, False),  # OpenID Connect §11: only on consent
        ("offline_access", "mcp:tools offline_access", "consent", True),
        ("never", "mcp:tools offline_access", "consent", False),
    ],
)
async def test_refresh_token_policies(
    browser: Browser,
    callback: CallbackServer,
    mode: str,
    scope: str,
    prompt: str | None,
    gets_refresh_token: bool,
) -> None:
    """`refresh_tokens` plays the providers that want offline_access, and those that never refresh."""
    resource = "http://127.0.0.1:9/mcp"
    with run_authorization_server(refresh_tokens=mode, redirect_uris=[callback.url]) as a:
        assert "offline_access" in a.metadata()["scopes_supported"]
        flow = await authorize(
            browser, a, callback, Client(**STATIC_PUBLIC), username="olga", resource=resource, scope=scope,
            extra={"prompt": prompt} if prompt else None,
        )  # fmt: skip
        assert ("refresh_token" in flow.tokens) is gets_refresh_token, flow.tokens.keys()
        if gets_refresh_token:
            assert refresh(a, flow, flow.tokens["refresh_token"], resource).status_code == 200


# --------------------------------------------------------------------------- resource server


def test_resource_server_challenges_without_token(auth: AuthorizationServer, rs: ResourceServer) -> None:
    r = httpx.post(rs.mcp_url, json=jsonrpc("tools/list"), timeout=5)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{rs.prm_url}"' in challenge
    assert 'scope="mcp:tools"' in challenge
    assert rs.prm_url == f"{rs.base_url}/.well-known/oauth-protected-resource/mcp"

    prm = httpx.get(rs.prm_url, timeout=5).json()
    assert prm["resource"] == rs.mcp_url
    assert prm["authorization_servers"] == [auth.issuer]
    assert prm["scopes_supported"] == ["mcp:tools", "admin"]
    assert httpx.get(f"{rs.base_url}/.well-known/oauth-protected-resource", timeout=5).status_code == 404

    r = httpx.post(rs.mcp_url, json=jsonrpc("tools/list"), headers=bearer("not-a-jwt"), timeout=5)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert f'resource_metadata="{rs.prm_url}"' in r.headers["www-authenticate"]


def test_resource_server_root_metadata_without_challenge_parameter(auth: AuthorizationServer) -> None:
    with run_resource_server(auth.issuer, prm_location="root", challenge_metadata=False) as r:
        resp = httpx.post(r.mcp_url, json=jsonrpc("tools/list"), timeout=5)
        assert resp.status_code == 401
        assert "resource_metadata" not in resp.headers["www-authenticate"]
        assert r.prm_url == f"{r.base_url}/.well-known/oauth-protected-resource"
        assert httpx.get(r.prm_url, timeout=5).json()["resource"] == r.mcp_url
        assert httpx.get(f"{r.prm_url}/mcp", timeout=5).status_code == 404


async def test_resource_server_refuses_token_for_another_resource(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    other = f"{rs.base_url}/other"
    flow = await authorize(browser, auth, callback, Client(**STATIC_PUBLIC), username="gina", resource=other)
    assert flow.claims["aud"] == other
    r = await raw_post(rs.mcp_url, jsonrpc("tools/list"), headers=bearer(flow.tokens["access_token"]))
    assert r.status_code == 401
    assert "wrong_audience" in (await rs.astats())["rejections"]


async def test_resource_server_insufficient_scope_then_step_up(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    client = Client(**STATIC_PUBLIC)
    flow = await authorize(
        browser, auth, callback, client, username="hank", resource=rs.resource, scope="mcp:tools"
    )
    call_admin = jsonrpc("tools/call", {"name": "admin_action", "arguments": {}})
    r = await raw_post(rs.mcp_url, call_admin, headers=bearer(flow.tokens["access_token"]))
    assert r.status_code == 403
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="mcp:tools admin"' in challenge
    assert f'resource_metadata="{rs.prm_url}"' in challenge

    # With the admin scope granted (a new authorization asking for it) the tool works.
    flow = await authorize(
        browser, auth, callback, client, username="hank", resource=rs.resource, scope="mcp:tools admin"
    )
    assert flow.tokens["scope"] == "mcp:tools admin"
    async with streamable_session(rs.mcp_url, headers=bearer(flow.tokens["access_token"])) as session:
        assert result_text(await session.call_tool("admin_action", {})) == "admin ok"


async def test_short_lived_access_token_expires_at_resource_server(
    browser: Browser, auth: AuthorizationServer, rs: ResourceServer, callback: CallbackServer
) -> None:
    auth.settings(access_token_ttl=1)
    try:
        flow = await authorize(
            browser, auth, callback, Client(**STATIC_PUBLIC), username="ivan", resource=rs.resource
        )
    finally:
        auth.settings(access_token_ttl=3600)
    assert flow.tokens["expires_in"] == 1
    await asyncio.sleep(1.6)
    r = await raw_post(rs.mcp_url, jsonrpc("tools/list"), headers=bearer(flow.tokens["access_token"]))
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    # A refresh gives a fresh token (with the TTL now in force) that works.
    r2 = refresh(auth, flow, flow.tokens["refresh_token"], rs.resource)
    assert r2.status_code == 200 and r2.json()["expires_in"] == 3600
    r = await raw_post(rs.mcp_url, jsonrpc("tools/list"), headers=bearer(r2.json()["access_token"]))
    assert r.status_code != 401


# --------------------------------------------------------------------------- Client ID Metadata Document


@pytest.fixture
def metadata_document_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """Serves a JSON document (the dict yielded, editable) at http://127.0.0.1:<port>/client.json."""
    doc: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(doc).encode()
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
        yield f"127.0.0.1:{httpd.server_address[1]}/client.json", doc
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_client_id_metadata_document(
    scheme: str,
    browser: Browser,
    callback: CallbackServer,
    metadata_document_server: tuple[str, dict[str, Any]],
) -> None:
    """CIMD with a loopback client id: https:// is fetched over http; http:// is accepted too."""
    where, doc = metadata_document_server
    client_id = f"{scheme}://{where}"
    doc.update(
        client_id=client_id,
        client_name="keybearer-cimd",
        redirect_uris=[callback.url],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
    )
    resource = "http://127.0.0.1:9/mcp"
    with run_authorization_server(cimd={"allow_http_loopback": True}) as a:
        assert a.metadata()["client_id_metadata_document_supported"] is True
        flow = await authorize(browser, a, callback, Client(client_id), username="judy", resource=resource)
        assert flow.claims["client_id"] == client_id
        assert refresh(a, flow, flow.tokens["refresh_token"], resource).status_code == 200
        assert a.stats()["cimd_fetches"] >= 1
        assert a.stats()["registrations"] == 0


# --------------------------------------------------------------------------- misc


def test_pkce_pair() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
