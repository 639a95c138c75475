"""The OAuth protocol edges, over real HTTP on loopback: discovery in each of
the spec's orders, the fetcher's URL and address checks, client registration
and the token endpoint. Small Starlette apps on uvicorn play the MCP server's
metadata and the authorization server; each test programs their routes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
import uvicorn
from aiohttp.abc import AbstractResolver, ResolveResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from support import free_port, wait_for_port

from proxy.app import Components, compose
from proxy.names import SecretKind
from proxy.oauth.client import (
    AuthServerUnavailable,
    ClientRegistration,
    OAuthError,
    authorization_url,
    check_callback_issuer,
    choose_auth_method,
    cimd_registration,
    client_metadata_document,
    exchange_code,
    pkce_pair,
    refresh,
    register_client,
    requested_scopes,
    revoke,
    static_registration,
)
from proxy.oauth.discovery import (
    AuthServer,
    Challenge,
    DiscoveryError,
    canonical_resource,
    discover,
    parse_www_authenticate,
    probe_challenge,
)
from proxy.oauth.fetch import Fetcher, FetchError, UnsafeURL
from proxy.settings import ServerConfig, Settings

PRM = "/.well-known/oauth-protected-resource"
OAS = "/.well-known/oauth-authorization-server"
OIDC = "/.well-known/openid-configuration"

# -- a programmable site ------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Site:
    """One uvicorn server whose answers each test sets: `site.json(path, doc)`."""

    port: int
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.routes.clear()
        self.seen.clear()

    def on(self, path: str, handler: Handler, method: str = "GET") -> None:
        self.routes[(method, path)] = handler

    def json(
        self,
        path: str,
        doc: Any,
        status: int = 200,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> None:
        async def handler(request: Request) -> Response:
            return JSONResponse(doc, status_code=status, headers=headers)

        self.on(path, handler, method)

    def paths(self) -> list[str]:
        return [s.path + (f"?{s.query}" if s.query else "") for s in self.seen]

    async def dispatch(self, request: Request) -> Response:
        body = await request.body()
        self.seen.append(
            Seen(request.method, request.url.path, request.url.query, dict(request.headers), body)
        )
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return await handler(request)


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[Site, Site]]:
    """Two sites: the MCP server (resource) and the authorization server."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []
    out = []
    for _ in range(2):
        site = Site(free_port())
        app = Starlette(
            routes=[Route("/{path:path}", site.dispatch, methods=["GET", "POST", "DELETE", "PUT"])]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=site.port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=1,
        )  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for_port(site.port)
        started.append((server, thread))
        out.append(site)
    yield out[0], out[1]
    for server, thread in started:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def rs(sites: tuple[Site, Site]) -> Site:
    sites[0].reset()
    return sites[0]


@pytest.fixture
def asrv(sites: tuple[Site, Site]) -> Site:
    sites[1].reset()
    return sites[1]


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher(allow_http_loopback=True, allow_private=False, timeout=2) as f:
        yield f


def as_metadata(base: str, **overrides: Any) -> dict[str, Any]:
    issuer = base
    doc = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "registration_endpoint": issuer + "/register",
        "revocation_endpoint": issuer + "/revoke",
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "scopes_supported": ["openid", "mcp"],
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


def prm(resource: str, *servers: str, **extra: Any) -> dict[str, Any]:
    return {"resource": resource, "authorization_servers": list(servers), **extra}


# -- WWW-Authenticate -------------------------------------------------------------


def test_challenge_spec_example() -> None:
    c = parse_www_authenticate(
        'Bearer resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource",\n'
        '                         scope="files:read"'.replace("\n", "")
    )
    assert c is not None
    assert c.resource_metadata == "https://mcp.example.com/.well-known/oauth-protected-resource"
    assert c.scope == ("files:read",)
    assert c.error is None


def test_challenge_among_other_schemes_with_escapes() -> None:
    header = (
        'Negotiate YIIB+w==, Basic realm="outer, with comma", '
        'Bearer realm="mcp", error="insufficient_scope", scope="files:read  files:write user:profile", '
        'error_description="need \\"write\\" \\\\ more", resource_metadata=https://x.example/prm, '
        'DPoP algs="ES256"'
    )
    c = parse_www_authenticate(header)
    assert c is not None
    assert c.error == "insufficient_scope"
    assert c.scope == ("files:read", "files:write", "user:profile")
    assert c.error_description == 'need "write" \\ more'
    assert c.resource_metadata == "https://x.example/prm"
    assert c.params["realm"] == "mcp"
    assert "algs" not in c.params  # DPoP's parameter stays with DPoP


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ('Basic realm="x"', None),
        ("Bearer", Challenge()),
        ("bearer error=invalid_token", Challenge(error="invalid_token", params={"error": "invalid_token"})),
        (["Basic realm=x", 'Bearer scope="a b"'], Challenge(scope=("a", "b"), params={"scope": "a b"})),
        ('BEARER Scope="a", SCOPE="b"', Challenge(scope=("a",), params={"scope": "a"})),
        ("Bearer ,, error=x ,", Challenge(error="x", params={"error": "x"})),
    ],
)
def test_challenge_cases(header: Any, expected: Challenge | None) -> None:
    assert parse_www_authenticate(header) == expected


# -- canonical server URI ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("https://mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        ("HTTPS://MCP.Example.COM/Mcp", "https://mcp.example.com/Mcp"),
        ("https://mcp.example.com/", "https://mcp.example.com"),
        ("https://mcp.example.com", "https://mcp.example.com"),
        ("https://mcp.example.com:443/mcp/", "https://mcp.example.com/mcp"),
        ("http://localhost:80/x", "http://localhost/x"),
        ("https://mcp.example.com:8443", "https://mcp.example.com:8443"),
        ("https://mcp.example.com/server/mcp#frag", "https://mcp.example.com/server/mcp"),
        ("https://mcp.example.com/mcp?tenant=a", "https://mcp.example.com/mcp?tenant=a"),
        ("https://[::1]:8443/mcp", "https://[::1]:8443/mcp"),
    ],
)
def test_canonical_resource(url: str, canonical: str) -> None:
    assert canonical_resource(url) == canonical


@pytest.mark.parametrize("url", ["mcp.example.com", "ftp://x/y", "https://user:pw@x/y", "https://x:99999/"])
def test_canonical_resource_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        canonical_resource(url)


# -- probing ----------------------------------------------------------------------


async def test_probe_challenge(rs: Site, fetcher: Fetcher) -> None:
    async def unauthorized(request: Request) -> Response:
        return Response(status_code=401, headers={
            "WWW-Authenticate": f'Bearer resource_metadata="{rs.url}/prm", scope="a b"'})  # fmt: skip

    rs.on("/mcp", unauthorized, "POST")
    challenge = await probe_challenge(fetcher, rs.url + "/mcp")
    assert challenge == Challenge(
        resource_metadata=rs.url + "/prm", scope=("a", "b"),
        params={"resource_metadata": rs.url + "/prm", "scope": "a b"},
    )  # fmt: skip
    sent = rs.seen[0]
    assert sent.method == "POST"
    assert sent.headers["accept"] == "application/json, text/event-stream"
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers
    assert sent.json["method"] == "initialize" and sent.json["jsonrpc"] == "2.0"

    # A 401 without a challenge.
    rs.on("/bare", lambda r: _response(Response(status_code=401)), "POST")
    assert await probe_challenge(fetcher, rs.url + "/bare") == Challenge()


async def test_probe_open_server_returns_none_and_ends_its_session(rs: Site, fetcher: Fetcher) -> None:
    rs.json("/mcp", {"jsonrpc": "2.0", "id": 0, "result": {}}, method="POST",
            headers={"Mcp-Session-Id": "s-1"})  # fmt: skip
    assert await probe_challenge(fetcher, rs.url + "/mcp") is None
    assert [(s.method, s.headers.get("mcp-session-id")) for s in rs.seen] == [
        ("POST", None),
        ("DELETE", "s-1"),
    ]


async def test_probe_does_not_wait_for_an_open_stream(rs: Site, fetcher: Fetcher) -> None:
    async def stream(request: Request) -> Response:
        async def forever() -> AsyncIterator[bytes]:
            yield b"event: message\ndata: {}\n\n"
            await asyncio.sleep(5)

        return StreamingResponse(forever(), media_type="text/event-stream")

    rs.on("/mcp", stream, "POST")
    started = time.monotonic()
    assert await probe_challenge(fetcher, rs.url + "/mcp") is None
    assert time.monotonic() - started < 1


async def test_probe_refuses_unsafe_server_url(fetcher: Fetcher) -> None:
    with pytest.raises(DiscoveryError, match=r"MCP server URL refused: .*plain http"):
        await probe_challenge(fetcher, "http://mcp.example.com/mcp")


async def _response(response: Response) -> Response:
    return response


# -- discovery: protected resource metadata -------------------------------------------


async def test_discovery_from_challenge_url(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json("/meta/prm", prm(rs.url + "/mcp", asrv.url, scopes_supported=["x"]))
    asrv.json(OAS, as_metadata(asrv.url))
    challenge = Challenge(resource_metadata=rs.url + "/meta/prm", scope=("files:read",))
    d = await discover(fetcher, rs.url + "/mcp", challenge)
    assert rs.paths() == ["/meta/prm"]  # no well-known probing when the challenge names it
    assert asrv.paths() == [OAS]
    assert d.resource == rs.url + "/mcp"
    assert d.scopes == ("files:read",)  # the challenge's scope wins
    assert d.resource_metadata_url == rs.url + "/meta/prm"
    a = d.auth_server
    assert (a.issuer, a.authorization_endpoint, a.token_endpoint) == (
        asrv.url, asrv.url + "/authorize", asrv.url + "/token")  # fmt: skip
    assert a.registration_endpoint == asrv.url + "/register"
    assert a.revocation_endpoint == asrv.url + "/revoke"
    assert a.code_challenge_methods_supported == ("S256",)
    assert a.token_endpoint_auth_methods_supported == ("client_secret_basic", "client_secret_post", "none")
    assert a.scopes_supported == ("openid", "mcp")
    assert not a.client_id_metadata_document_supported
    assert a.raw["issuer"] == asrv.url


async def test_discovery_challenge_url_missing_is_an_error(rs: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", rs.url))
    with pytest.raises(DiscoveryError, match=r"named by the server's 401: .*/nope answered HTTP 404"):
        await discover(fetcher, rs.url + "/mcp", Challenge(resource_metadata=rs.url + "/nope"))


async def test_discovery_path_aware_prm(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/tenant/mcp", prm(rs.url + "/tenant/mcp", asrv.url, scopes_supported=["mcp", "read"]))
    rs.json(PRM, prm(rs.url, "https://wrong.example"))
    asrv.json(OAS, as_metadata(asrv.url))
    d = await discover(fetcher, rs.url + "/tenant/mcp", None)
    assert rs.paths() == [PRM + "/tenant/mcp"]
    assert rs.seen[0].headers["mcp-protocol-version"] == "2025-11-25"
    assert d.scopes == ("mcp", "read")  # no challenge scope: the metadata's scopes_supported
    assert d.resource == rs.url + "/tenant/mcp"


async def test_discovery_root_prm(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    # The root document names the origin (RFC 9728 §3.3): it covers /mcp.
    rs.json(PRM, prm(rs.url, asrv.url))
    asrv.json(OAS, as_metadata(asrv.url))
    d = await discover(fetcher, rs.url + "/mcp", Challenge(error="invalid_token"))
    assert rs.paths() == [PRM + "/mcp", PRM]
    assert d.resource == rs.url
    assert d.scopes == ()


async def test_discovery_server_at_root(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json(PRM, prm(rs.url + "/", asrv.url))
    asrv.json(OAS, as_metadata(asrv.url))
    d = await discover(fetcher, rs.url + "/", None)
    assert rs.paths() == [PRM]
    assert d.resource == rs.url + "/"  # as the server declares it


@pytest.mark.parametrize("declared", ["{rs}/other", "{rs}/mcpx", "{asrv}/mcp", "{rs}/mcp/deeper"])
async def test_discovery_prm_resource_mismatch_refused(
    rs: Site, asrv: Site, fetcher: Fetcher, declared: str
) -> None:
    resource = declared.format(rs=rs.url, asrv=asrv.url)
    rs.json(PRM + "/mcp", prm(resource, asrv.url))
    asrv.json(OAS, as_metadata(asrv.url))
    with pytest.raises(DiscoveryError) as info:
        await discover(fetcher, rs.url + "/mcp", None)
    assert f"is for resource {resource!r}, not for the MCP server {rs.url + '/mcp'!r}" in str(info.value)
    assert asrv.seen == []


async def test_discovery_prm_resource_case_and_slash_tolerated(
    rs: Site, asrv: Site, fetcher: Fetcher
) -> None:
    declared = rs.url.replace("http://", "HTTP://") + "/mcp/"
    rs.json(PRM + "/mcp", prm(declared, asrv.url))
    asrv.json(OAS, as_metadata(asrv.url))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert d.resource == declared


async def test_discovery_prm_without_authorization_servers(rs: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", {"resource": rs.url + "/mcp", "authorization_servers": []})
    with pytest.raises(DiscoveryError, match="lists no `authorization_servers`"):
        await discover(fetcher, rs.url + "/mcp", None)


async def test_discovery_prm_5xx_stops_discovery(rs: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", {"error": "boom"}, status=503)
    with pytest.raises(DiscoveryError) as info:
        await discover(fetcher, rs.url + "/mcp", None)
    assert info.value.transient
    assert rs.paths() == [PRM + "/mcp"]  # no fallback on an outage


async def test_discovery_first_authorization_server_is_used(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url + "/one", asrv.url + "/two"))
    asrv.json(OAS + "/one", as_metadata(asrv.url + "/one"))
    asrv.json(OAS + "/two", as_metadata(asrv.url + "/two"))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert d.auth_server.issuer == asrv.url + "/one"


# -- discovery: authorization server metadata -----------------------------------------


@pytest.mark.parametrize(
    ("variant", "tried"),
    [
        (OAS + "/tenant1", [OAS + "/tenant1"]),
        (OIDC + "/tenant1", [OAS + "/tenant1", OIDC + "/tenant1"]),
        ("/tenant1" + OIDC, [OAS + "/tenant1", OIDC + "/tenant1", "/tenant1" + OIDC]),
    ],
)
async def test_issuer_with_path(
    rs: Site, asrv: Site, fetcher: Fetcher, variant: str, tried: list[str]
) -> None:
    issuer = asrv.url + "/tenant1"
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", issuer))
    asrv.json(variant, as_metadata(issuer))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert asrv.paths() == tried
    assert d.auth_server.issuer == issuer
    assert d.auth_server.metadata_url == asrv.url + variant


@pytest.mark.parametrize(("variant", "tried"), [(OAS, [OAS]), (OIDC, [OAS, OIDC])])
async def test_issuer_without_path(
    rs: Site, asrv: Site, fetcher: Fetcher, variant: str, tried: list[str]
) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url))
    asrv.json(variant, as_metadata(asrv.url))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert asrv.paths() == tried
    assert d.auth_server.metadata_url == asrv.url + variant


async def test_issuer_with_trailing_slash(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    issuer = asrv.url + "/"
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", issuer))
    asrv.json(OAS, as_metadata(asrv.url, issuer=issuer))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert d.auth_server.issuer == issuer


@pytest.mark.parametrize("published", ["{asrv}/", "{asrv}/tenant1", "https://evil.example", None])
async def test_issuer_mismatch_refused(rs: Site, asrv: Site, fetcher: Fetcher, published: str | None) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url))
    issuer = published.format(asrv=asrv.url) if published else None
    asrv.json(OAS, as_metadata(asrv.url, issuer=issuer))
    with pytest.raises(DiscoveryError) as info:
        await discover(fetcher, rs.url + "/mcp", None)
    message = str(info.value)
    assert f"names issuer {issuer!r}, but it must be exactly {asrv.url!r}" in message
    assert asrv.url + OAS in message


@pytest.mark.parametrize("methods", [None, ["plain"], []])
async def test_missing_s256_refused(rs: Site, asrv: Site, fetcher: Fetcher, methods: Any) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url))
    asrv.json(OIDC, as_metadata(asrv.url, code_challenge_methods_supported=methods))
    with pytest.raises(DiscoveryError) as info:
        await discover(fetcher, rs.url + "/mcp", None)
    message = str(info.value)
    assert "does not advertise PKCE with S256" in message
    assert "requires clients to refuse" in message
    assert asrv.url + OIDC in message


async def test_no_as_metadata_anywhere(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url + "/t"))
    with pytest.raises(DiscoveryError, match="publishes no metadata") as info:
        await discover(fetcher, rs.url + "/mcp", None)
    assert len(asrv.seen) == 3
    for path in (OAS + "/t", OIDC + "/t", "/t" + OIDC):
        assert f"{asrv.url}{path} answered HTTP 404" in str(info.value)


async def test_as_metadata_missing_token_endpoint(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url))
    asrv.json(OAS, as_metadata(asrv.url, token_endpoint=None))
    with pytest.raises(DiscoveryError, match="has no token_endpoint"):
        await discover(fetcher, rs.url + "/mcp", None)


async def test_as_endpoint_must_be_https(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url))
    asrv.json(OAS, as_metadata(asrv.url, authorization_endpoint="http://login.example.com/authorize"))
    with pytest.raises(DiscoveryError, match=r"authorization_endpoint refused: .*plain http is refused"):
        await discover(fetcher, rs.url + "/mcp", None)


async def test_unsafe_authorization_server_refused_before_fetching(rs: Site, fetcher: Fetcher) -> None:
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", "https://169.254.169.254/"))
    with pytest.raises(DiscoveryError, match="cloud metadata address"):
        await discover(fetcher, rs.url + "/mcp", None)


# -- discovery: the 2025-03-26 fallback ---------------------------------------------


async def test_legacy_fallback_origin_metadata(rs: Site, fetcher: Fetcher) -> None:
    rs.json(OAS, as_metadata(rs.url, scopes_supported=None))
    d = await discover(fetcher, rs.url + "/v1/mcp", Challenge(scope=("s",)))
    assert rs.paths() == [PRM + "/v1/mcp", PRM, OAS]
    assert d.resource_metadata is None
    assert d.resource == rs.url + "/v1/mcp"
    assert d.auth_server.issuer == rs.url
    assert d.auth_server.token_endpoint == rs.url + "/token"
    assert d.scopes == ("s",)


async def test_legacy_fallback_openid_configuration(rs: Site, fetcher: Fetcher) -> None:
    rs.json(OIDC, as_metadata(rs.url))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert rs.paths() == [PRM + "/mcp", PRM, OAS, OIDC]
    assert d.auth_server.metadata_url == rs.url + OIDC


async def test_legacy_fallback_default_endpoints(rs: Site, fetcher: Fetcher) -> None:
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert rs.paths() == [PRM + "/mcp", PRM, OAS, OIDC]
    a = d.auth_server
    assert (a.issuer, a.authorization_endpoint, a.token_endpoint, a.registration_endpoint) == (
        rs.url, rs.url + "/authorize", rs.url + "/token", rs.url + "/register")  # fmt: skip
    assert a.raw == {} and a.metadata_url is None
    assert d.scopes == ()


async def test_legacy_fallback_still_refuses_missing_s256(rs: Site, fetcher: Fetcher) -> None:
    rs.json(OAS, as_metadata(rs.url, code_challenge_methods_supported=None))
    with pytest.raises(DiscoveryError, match="S256"):
        await discover(fetcher, rs.url + "/mcp", None)


async def test_legacy_fallback_skips_html_pages(rs: Site, fetcher: Fetcher) -> None:
    async def html(request: Request) -> Response:
        return Response("<html>app shell</html>", media_type="text/html")

    for path in (PRM + "/mcp", PRM, OAS):
        rs.on(path, html)
    rs.json(OIDC, as_metadata(rs.url))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert d.auth_server.metadata_url == rs.url + OIDC


# -- discovery: the edges the official SDKs disagree on (docs/oauth.md, "Discovery: what is accepted")


async def test_legacy_fallback_issuer_with_path_on_the_same_origin(rs: Site, fetcher: Fetcher) -> None:
    """A 2025-03-26 server whose origin metadata names a tenant issuer on that origin."""
    issuer = rs.url + "/tenant1"
    rs.json(OAS, as_metadata(issuer))
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert rs.paths() == [PRM + "/mcp", PRM, OAS]
    assert d.resource_metadata is None
    a = d.auth_server
    assert (a.issuer, a.token_endpoint, a.metadata_url) == (issuer, issuer + "/token", rs.url + OAS)
    # RFC 9207: the callback's iss must be that issuer, exactly.
    check_callback_issuer(a, issuer)
    for other in (rs.url, issuer + "/", rs.url + "/tenant2"):
        with pytest.raises(OAuthError, match="comes from issuer"):
            check_callback_issuer(a, other)


@pytest.mark.parametrize("issuer", ["{asrv}", "{asrv}/tenant1", "https://login.example.com/tenant1", None])
async def test_legacy_fallback_issuer_elsewhere_refused(
    rs: Site, asrv: Site, fetcher: Fetcher, issuer: str | None
) -> None:
    named = issuer.format(asrv=asrv.url) if issuer else None
    rs.json(OAS, as_metadata(rs.url, issuer=named))
    with pytest.raises(DiscoveryError) as info:
        await discover(fetcher, rs.url + "/mcp", None)
    assert f"names issuer {named!r}, which is not on the MCP server's origin {rs.url}" in str(info.value)
    assert asrv.seen == []


async def test_oidc_only_provider_with_a_path(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    """Keycloak-style: only {issuer}/.well-known/openid-configuration, OpenID fields, no DCR."""
    issuer = asrv.url + "/realms/acme"
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", issuer))
    asrv.json("/realms/acme" + OIDC, as_metadata(
        issuer, registration_endpoint=None, token_endpoint_auth_methods_supported=None,
        authorization_endpoint=issuer + "/protocol/openid-connect/auth",
        token_endpoint=issuer + "/protocol/openid-connect/token",
        response_types_supported=["code", "id_token", "code id_token"],
        subject_types_supported=["public"], id_token_signing_alg_values_supported=["RS256"],
        jwks_uri=issuer + "/protocol/openid-connect/certs",
    ))  # fmt: skip
    d = await discover(fetcher, rs.url + "/mcp", None)
    assert asrv.paths() == [OAS + "/realms/acme", OIDC + "/realms/acme", "/realms/acme" + OIDC]
    a = d.auth_server
    assert (a.issuer, a.registration_endpoint, a.token_endpoint_auth_methods_supported) == (
        issuer,
        None,
        None,
    )
    assert a.token_endpoint == issuer + "/protocol/openid-connect/token"
    with pytest.raises(OAuthError) as info:
        await register_client(fetcher, a, REDIRECT, "Keybearer", ())
    assert info.value.error == "registration_not_supported"  # configure a static client


async def test_oidc_only_provider_without_pkce_refused(rs: Site, asrv: Site, fetcher: Fetcher) -> None:
    """Entra ID-style OpenID metadata lists no code_challenge_methods_supported: the spec says refuse."""
    rs.json(PRM + "/mcp", prm(rs.url + "/mcp", asrv.url + "/tenant1/v2.0"))
    asrv.json(
        "/tenant1/v2.0" + OIDC, as_metadata(asrv.url + "/tenant1/v2.0", code_challenge_methods_supported=None)
    )
    with pytest.raises(DiscoveryError, match="does not advertise PKCE with S256"):
        await discover(fetcher, rs.url + "/mcp", None)


@pytest.mark.parametrize("where", ["rs", "asrv"])
async def test_resource_metadata_only_where_the_challenge_says(
    rs: Site, asrv: Site, fetcher: Fetcher, where: str
) -> None:
    """No well-known document at all: the 401's resource_metadata names a custom location
    (on the server's origin or another): the probe finds it and nothing else is fetched."""
    host = rs if where == "rs" else asrv
    location = host.url + "/config/mcp-resource.json"

    async def unauthorized(request: Request) -> Response:
        challenge = f'Bearer realm="mcp", resource_metadata="{location}", scope="notes:read"'
        return Response(status_code=401, headers={"WWW-Authenticate": challenge})

    rs.on("/v1/mcp", unauthorized, "POST")
    host.json("/config/mcp-resource.json", prm(rs.url + "/v1/mcp", asrv.url + "/t1"))
    asrv.json(OAS + "/t1", as_metadata(asrv.url + "/t1"))
    challenge = await probe_challenge(fetcher, rs.url + "/v1/mcp")
    d = await discover(fetcher, rs.url + "/v1/mcp", challenge)
    assert rs.paths() == ["/v1/mcp"] + (["/config/mcp-resource.json"] if where == "rs" else [])
    assert asrv.paths() == (["/config/mcp-resource.json"] if where == "asrv" else []) + [OAS + "/t1"]
    assert (d.resource_metadata_url, d.resource, d.scopes) == (location, rs.url + "/v1/mcp", ("notes:read",))
    assert d.auth_server.issuer == asrv.url + "/t1"


async def test_resource_metadata_at_a_custom_location_must_name_the_server(
    rs: Site, asrv: Site, fetcher: Fetcher
) -> None:
    asrv.json("/prm.json", prm(asrv.url + "/mcp", asrv.url))
    with pytest.raises(DiscoveryError, match="is for resource"):
        await discover(fetcher, rs.url + "/mcp", Challenge(resource_metadata=asrv.url + "/prm.json"))


# -- the fetcher's checks ------------------------------------------------------------


class CountingResolver(AbstractResolver):
    """Maps names onto fixed addresses, and counts lookups."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        address = self.names[host]
        return [ResolveResult(hostname=host, host=address, port=port,
                              family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/.well-known/x", "plain http is refused"),
        ("ftp://example.com/x", "not an absolute https:// URL"),
        ("https://user:pw@example.com/x", "credentials"),
        ("http://169.254.169.254/", "cloud metadata address"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        ("https://[fd00:ec2::254]/", "cloud metadata address"),
        ("https://100.100.100.200/", "cloud metadata address"),
        ("https://[::ffff:169.254.169.254]/", "cloud metadata address"),
        ("https://[2002:a9fe:a9fe::1]/", "cloud metadata address"),
        ("https://[64:ff9b::10.0.0.1]/", "private address"),
        ("https://169.254.10.1/", "link-local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[::]/", "unspecified"),
        ("https://224.0.0.1/", "multicast"),
        ("https://255.255.255.255/", "broadcast"),
        ("https://10.1.2.3/", "private address"),
        ("https://172.16.0.1/", "private address"),
        ("https://192.168.1.1/", "private address"),
        ("https://100.64.0.1/", "private address"),
        ("https://[fd12:3456::1]/", "private address"),
        ("https://127.0.0.1/", "loopback"),
        ("https://[::1]/", "loopback"),
        ("https://192.0.2.1/", "reserved"),
        ("https://2130706433/", "numeric host"),
        ("https://0x7f.1/", "numeric host"),
    ],
)
async def test_unsafe_urls_refused_before_any_network(url: str, reason: str) -> None:
    resolver = CountingResolver({})
    async with Fetcher(allow_http_loopback=False, allow_private=False, resolver=resolver) as f:
        with pytest.raises(UnsafeURL) as info:
            await f.get_json(url)
    assert reason in str(info.value)
    assert urlsplit(url).hostname in str(info.value) and "pw" not in str(info.value)
    assert resolver.calls == []


async def test_metadata_address_refused_even_where_private_allowed() -> None:
    async with Fetcher(allow_http_loopback=True, allow_private=True) as f:
        for url in ("https://100.100.100.200/", "https://[fd00:ec2::254]/", "http://169.254.169.254/"):
            with pytest.raises(UnsafeURL, match="cloud metadata"):
                await f.get_json(url)
        f.check_url("https://10.1.2.3/x")  # private addresses are allowed here
        f.check_url("https://[fd12::1]/x")


async def test_names_are_checked_at_resolution() -> None:
    resolver = CountingResolver({"meta.example": "169.254.169.254", "internal.example": "10.1.2.3",
                                 "six.example": "fe80::1"})  # fmt: skip
    async with Fetcher(allow_http_loopback=False, allow_private=False, resolver=resolver) as f:
        with pytest.raises(UnsafeURL) as info:
            await f.get_json("https://meta.example/x")
        assert str(info.value).startswith("https://meta.example/x: refused because")
        assert "169.254.169.254" in str(info.value) and "cloud metadata" in str(info.value)
        with pytest.raises(UnsafeURL, match="private address"):
            await f.get_json("https://internal.example/x")
        with pytest.raises(UnsafeURL, match="link-local"):
            await f.get_json("https://six.example/x")
    # Allowed private addresses pass the check and are connected to.
    async with Fetcher(allow_http_loopback=False, allow_private=True, timeout=0.5, resolver=resolver) as f:
        with pytest.raises(FetchError):  # whatever answers there (if anything), it was connected to
            await f.get_json("https://internal.example:9/x")
    assert resolver.calls.count("internal.example") == 2


async def test_loopback_name_refused_unless_allowed(rs: Site) -> None:
    rs.json("/doc", {"ok": True})
    async with Fetcher(allow_http_loopback=False, allow_private=True) as f:
        with pytest.raises(UnsafeURL, match=r"resolves to 127\.0\.0\.1, and it is a loopback address"):
            await f.get_json(f"https://localhost:{rs.port}/doc")
    async with Fetcher(allow_http_loopback=True, allow_private=False) as f:
        assert await f.get_json(f"http://localhost:{rs.port}/doc") == {"ok": True}


async def test_localhost_name_must_resolve_to_loopback() -> None:
    resolver = CountingResolver({"localhost": "93.184.216.34"})
    async with Fetcher(allow_http_loopback=True, allow_private=False, resolver=resolver) as f:
        with pytest.raises(UnsafeURL, match="localhost name must resolve to loopback"):
            await f.get_json("http://localhost:1/x")


async def test_redirect_not_followed(rs: Site, fetcher: Fetcher) -> None:
    async def moved(request: Request) -> Response:
        return Response(status_code=302, headers={"Location": rs.url + "/target"})

    rs.on("/doc", moved)
    rs.json("/target", {"ok": True})
    with pytest.raises(FetchError, match=r"redirect \(HTTP 302 to .*/target\); redirects are not followed"):
        await fetcher.get_json(rs.url + "/doc")
    rs.on("/token", moved, "POST")
    with pytest.raises(FetchError, match="redirect"):
        await fetcher.post_form(rs.url + "/token", {"a": "b"})
    assert rs.paths() == ["/doc", "/token"]


async def test_oversized_response_refused(rs: Site) -> None:
    big = {"pad": "x" * 5000}
    rs.json("/big", big)

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"pad": "'
            for _ in range(100):
                yield b"x" * 1000
                await asyncio.sleep(0)
            yield b'"}'

        return StreamingResponse(chunks(), media_type="application/json")  # chunked: no length

    rs.on("/stream", stream)
    async with Fetcher(allow_http_loopback=True, allow_private=False, max_bytes=4096) as f:
        with pytest.raises(FetchError, match="over the limit of 4096"):
            await f.get_json(rs.url + "/big")
        with pytest.raises(FetchError, match="more than 4096 bytes"):
            await f.get_json(rs.url + "/stream")
    async with Fetcher(allow_http_loopback=True, allow_private=False) as f:
        assert await f.get_json(rs.url + "/big") == big


async def test_wrong_content_refused(rs: Site, fetcher: Fetcher) -> None:
    rs.on("/html", lambda r: _response(Response("<html></html>", media_type="text/html")))
    rs.json("/list", ["not", "an", "object"])
    for path in ("/html", "/list"):
        with pytest.raises(FetchError, match="did not answer with a JSON object") as info:
            await fetcher.get_json(rs.url + path)
        assert not info.value.transient


async def test_hanging_server_times_out(rs: Site) -> None:
    async def hang(request: Request) -> Response:
        await asyncio.sleep(5)
        return JSONResponse({})

    rs.on("/slow", hang)
    async with Fetcher(allow_http_loopback=True, allow_private=False, timeout=0.5) as f:
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"did not answer within 0.5 s") as info:
            await f.get_json(rs.url + "/slow")
        assert time.monotonic() - started < 2
        assert info.value.transient


async def test_connection_refused_is_transient() -> None:
    async with Fetcher(allow_http_loopback=True, allow_private=False) as f:
        with pytest.raises(FetchError, match="could not be reached") as info:
            await f.get_json(f"http://127.0.0.1:{free_port()}/x")
        assert info.value.transient


# -- client registration ---------------------------------------------------------------


def auth_server_for(site: Site, **overrides: Any) -> AuthServer:
    doc = as_metadata(site.url, **overrides)
    return AuthServer(
        issuer=doc["issuer"],
        authorization_endpoint=doc["authorization_endpoint"],
        token_endpoint=doc["token_endpoint"],
        registration_endpoint=doc.get("registration_endpoint"),
        revocation_endpoint=doc.get("revocation_endpoint"),
        token_endpoint_auth_methods_supported=(
            tuple(doc["token_endpoint_auth_methods_supported"])
            if "token_endpoint_auth_methods_supported" in doc else None
        ),
        client_id_metadata_document_supported=bool(doc.get("client_id_metadata_document_supported")),
        authorization_response_iss_parameter_supported=bool(
            doc.get("authorization_response_iss_parameter_supported")),
        raw=doc,
    )  # fmt: skip


REDIRECT = "https://proxy.example.com/oauth/callback"


async def test_dynamic_registration(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/register", {"client_id": "c-1", "client_secret": "dcr-secret-1234",
                            "client_secret_expires_at": 0, "token_endpoint_auth_method": "client_secret_basic",
                            "redirect_uris": [REDIRECT]}, status=201, method="POST")  # fmt: skip
    reg = await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ["mcp", "read"])
    body = asrv.seen[0].json
    assert body == {
        "redirect_uris": [REDIRECT],
        "client_name": "Keybearer",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
        "scope": "mcp read",
    }
    assert asrv.seen[0].headers["content-type"] == "application/json"
    assert reg == ClientRegistration(client_id="c-1", client_secret="dcr-secret-1234",
                                     auth_method="client_secret_basic", issuer=asrv.url,
                                     redirect_uri=REDIRECT, source="dcr", raw={})  # fmt: skip
    assert reg.raw["client_secret_expires_at"] == 0
    assert "dcr-secret" not in repr(reg)


@pytest.mark.parametrize(
    ("supported", "asked"),
    [
        (None, "client_secret_basic"),
        (["client_secret_post", "none"], "client_secret_post"),
        (["none"], "none"),
        (["private_key_jwt", "none"], "none"),
    ],
)
async def test_registration_auth_method_choice(
    asrv: Site, fetcher: Fetcher, supported: list[str] | None, asked: str
) -> None:
    asrv.json("/register", {"client_id": "c-2"}, status=201, method="POST")
    server = auth_server_for(asrv, token_endpoint_auth_methods_supported=supported)
    reg = await register_client(fetcher, server, REDIRECT, "Keybearer", ())
    assert asrv.seen[0].json["token_endpoint_auth_method"] == asked
    assert "scope" not in asrv.seen[0].json
    assert (reg.client_secret, reg.auth_method) == (None, "none")  # no secret issued: a public client


async def test_registration_errors(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/register", {"error": "invalid_redirect_uri", "error_description": "not https"},
              status=400, method="POST")  # fmt: skip
    with pytest.raises(OAuthError) as info:
        await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ())
    assert (info.value.error, info.value.description, info.value.http_status) == (
        "invalid_redirect_uri", "not https", 400)  # fmt: skip
    asrv.json("/register", {"client_name": "no id"}, status=201, method="POST")
    with pytest.raises(OAuthError, match="no client_id") as info:
        await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ())
    assert info.value.error == "invalid_response"
    with pytest.raises(OAuthError) as info:
        await register_client(fetcher, auth_server_for(asrv, registration_endpoint=None), REDIRECT, "K", ())
    assert info.value.error == "registration_not_supported"
    with pytest.raises(OAuthError) as info:
        await register_client(
            fetcher, auth_server_for(asrv, token_endpoint_auth_methods_supported=["private_key_jwt"]),
            REDIRECT, "K", (),
        )  # fmt: skip
    assert info.value.error == "unsupported_auth_method"


# What the registration answer says is what the client is (RFC 7591 §3.2.1: the
# server may replace what was asked for); the token requests follow it.


@pytest.mark.parametrize(
    ("supported", "answered", "secret", "method"),
    [
        (["none"], None, "issued-secret-5678", "none"),  # public only: the secret is ignored
        (["none"], "none", "issued-secret-5678", "none"),
        (["client_secret_basic", "none"], "none", "issued-secret-5678", "none"),
        (["client_secret_basic"], None, "issued-secret-5678", "client_secret_basic"),
        (["client_secret_basic", "client_secret_post"], "client_secret_post", "issued-secret-5678",
         "client_secret_post"),
        (["client_secret_basic"], None, None, "none"),  # no secret: a public client
    ],
)  # fmt: skip
async def test_registration_answer_decides_the_auth_method(
    asrv: Site, fetcher: Fetcher, supported: list[str], answered: str | None, secret: str | None, method: str
) -> None:
    answer: dict[str, Any] = {"client_id": "c-3", "client_secret_expires_at": 0}
    if answered:
        answer["token_endpoint_auth_method"] = answered
    if secret:
        answer["client_secret"] = secret
    asrv.json("/register", answer, status=201, method="POST")
    server = auth_server_for(asrv, token_endpoint_auth_methods_supported=supported)
    reg = await register_client(fetcher, server, REDIRECT, "Keybearer", ())
    assert reg.auth_method == method
    assert reg.client_secret == (secret if method != "none" else None)
    asrv.json("/token", TOKENS, method="POST")
    await exchange_code(fetcher, server, reg, "code-1", REDIRECT, "verifier-1", None)
    sent = asrv.seen[-1]
    if method == "none":  # PKCE alone: the issued secret goes nowhere
        assert "authorization" not in sent.headers
        assert sent.form["client_id"] == "c-3" and "client_secret" not in sent.form
    elif method == "client_secret_post":
        assert sent.form["client_secret"] == secret
    else:
        assert sent.headers["authorization"].startswith("Basic ") and "client_secret" not in sent.form


async def test_registration_answered_200_and_secret_expiry(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/register", {"client_id": "c-5", "client_secret": "s-5-abcdef", "redirect_uris": [REDIRECT],
                            "client_secret_expires_at": 1893456000}, status=200, method="POST")  # fmt: skip
    reg = await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ())
    assert (reg.client_id, reg.auth_method, reg.secret_expires_at) == (
        "c-5",
        "client_secret_basic",
        1893456000,
    )
    for never in (0, None, "soon", True):
        asrv.json("/register", {"client_id": "c-6", "client_secret": "s-6-abcdef",
                                "client_secret_expires_at": never}, status=201, method="POST")  # fmt: skip
        reg = await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ())
        assert reg.secret_expires_at is None, never


@pytest.mark.parametrize(
    ("answer", "missing"),
    [
        ({"redirect_uris": ["https://elsewhere.example/cb"]}, f"without the redirect URI {REDIRECT}"),
        ({"grant_types": ["refresh_token"]}, "without the authorization_code grant"),
        ({"response_types": ["token"]}, "without the response type code"),
        ({"redirect_uris": [], "grant_types": []}, "redirect URI https://proxy.example.com/oauth/callback and "
                                                   "the authorization_code grant"),
        ({"token_endpoint_auth_method": "client_secret_post"}, "for client_secret_post but issued no client_secret"),
    ],
)  # fmt: skip
async def test_registration_without_what_sign_in_needs_refused(
    asrv: Site, fetcher: Fetcher, answer: dict[str, Any], missing: str
) -> None:
    asrv.json("/register", {"client_id": "c-4", **answer}, status=201, method="POST")
    with pytest.raises(OAuthError) as info:
        await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ())
    assert info.value.error == "registration_incomplete"
    assert missing in str(info.value) and asrv.url in str(info.value)


async def test_registration_keeps_refresh_and_may_lose_it(asrv: Site, fetcher: Fetcher) -> None:
    """The proxy asks for refresh_token; a server that leaves it out still gives a usable client."""
    asrv.json(
        "/register", {"client_id": "c-7", "grant_types": ["authorization_code"]}, status=201, method="POST"
    )
    reg = await register_client(fetcher, auth_server_for(asrv), REDIRECT, "Keybearer", ())
    assert asrv.seen[0].json["grant_types"] == ["authorization_code", "refresh_token"]
    assert reg.client_id == "c-7"


@pytest.mark.parametrize(
    ("listed", "scopes", "asked"),
    [
        (["openid", "offline_access", "mcp"], ("mcp",), ("mcp", "offline_access")),
        (["openid", "offline_access"], ("mcp", "offline_access"), ("mcp", "offline_access")),
        (["openid", "mcp"], ("mcp",), ("mcp",)),  # never when the server does not list it
        (None, ("mcp",), ("mcp",)),
        (["offline_access"], (), ()),  # never alone: no scope keeps the server's defaults
    ],
)
def test_offline_access_requested_where_listed(
    listed: list[str] | None, scopes: tuple[str, ...], asked: tuple[str, ...]
) -> None:
    server = AuthServer("https://as.example", "https://as.example/a", "https://as.example/t",
                        scopes_supported=tuple(listed) if listed is not None else None)  # fmt: skip
    assert requested_scopes(server, scopes) == asked


# -- stored registrations (proxy/connect/clients.py, on a real SQLite store) -----------------


@pytest.fixture
async def parts(tmp_path: Path, rs: Site) -> AsyncIterator[Components]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/kb.db", salt=secrets.token_urlsafe(48), oauth_allow_http_loopback=True,
        public_url="https://proxy.example.com",
        servers={"notes": ServerConfig(id="notes", url=rs.url + "/mcp", auth="oauth")},
    )  # fmt: skip
    components = compose(settings)
    async with components.opened():
        await components.fetcher.start()
        try:
            yield components
        finally:
            await components.fetcher.close()


def registrar(site: Site, *answers: dict[str, Any]) -> None:
    """/register answers each of `answers` in turn (the last one from then on)."""

    async def register(request: Request) -> Response:
        count = sum(1 for s in site.seen if s.path == "/register")
        return JSONResponse({"client_id": f"c-{count}", **answers[min(count, len(answers)) - 1]}, 201)

    site.on("/register", register, "POST")


async def test_stored_registration_renewed_before_its_secret_expires(asrv: Site, parts: Components) -> None:
    server, auth_server = parts.registry.servers["notes"], auth_server_for(asrv)
    registrar(
        asrv,
        {"client_secret": "secret-1-abcdef", "client_secret_expires_at": int(time.time()) + 120},
        {"client_secret": "secret-2-abcdef", "client_secret_expires_at": int(time.time()) + 86400},
    )
    first = await parts.clients.client_for(server, auth_server)
    assert (first.client_id, first.source) == ("c-1", "dcr")
    # Expiring within the renewal margin: as good as absent, so registered again ...
    second = await parts.clients.client_for(server, auth_server)
    assert (second.client_id, second.client_secret) == ("c-2", "secret-2-abcdef")
    # ... and the new one, good for a day, is stored and reused.
    assert await parts.clients.client_for(server, auth_server) == second
    assert second.secret_expires_at is not None and second.secret_expires_at > time.time() + 3600
    assert [s.path for s in asrv.seen] == ["/register", "/register"]


async def test_stored_registration_without_expiry_is_reused(asrv: Site, parts: Components) -> None:
    server, auth_server = parts.registry.servers["notes"], auth_server_for(asrv)
    registrar(asrv, {"client_secret": "secret-1-abcdef", "client_secret_expires_at": 0})
    first = await parts.clients.client_for(server, auth_server)
    assert await parts.clients.client_for(server, auth_server) == first
    assert len(asrv.seen) == 1


async def test_incomplete_registration_is_not_stored(asrv: Site, parts: Components) -> None:
    server, auth_server = parts.registry.servers["notes"], auth_server_for(asrv)
    registrar(asrv, {"redirect_uris": ["https://elsewhere.example/cb"]}, {})
    with pytest.raises(OAuthError) as info:
        await parts.clients.client_for(server, auth_server)
    assert info.value.error == "registration_incomplete"
    assert "https://proxy.example.com/oauth/callback" in str(info.value)
    name = f"notes|{asrv.url}|https://proxy.example.com/oauth/callback"
    assert await parts.secrets.get(SecretKind.CLIENT_REGISTRATION, name) is None
    assert (await parts.clients.client_for(server, auth_server)).client_id == "c-2"


def test_choose_auth_method() -> None:
    def server(methods: list[str] | None) -> AuthServer:
        return AuthServer(issuer="https://as.example", authorization_endpoint="https://as.example/a",
                          token_endpoint="https://as.example/t",
                          token_endpoint_auth_methods_supported=tuple(methods) if methods is not None else None)  # fmt: skip

    assert choose_auth_method(server(None), True) == "client_secret_basic"
    assert choose_auth_method(server(None), False) == "none"
    assert (
        choose_auth_method(server(["client_secret_post", "client_secret_basic"]), True)
        == "client_secret_basic"
    )
    assert choose_auth_method(server(["none", "client_secret_post"]), True) == "client_secret_post"
    assert choose_auth_method(server(["client_secret_basic"]), False) == "none"
    with pytest.raises(OAuthError, match="private_key_jwt"):
        choose_auth_method(server(["private_key_jwt"]), True)
    # A public-only server: a configured secret stays unused, PKCE alone authenticates.
    assert choose_auth_method(server(["private_key_jwt", "none"]), True) == "none"
    static = static_registration(server(["none"]), "static-1", "configured-secret", REDIRECT)
    assert (static.auth_method, static.client_secret) == ("none", None)
    static = static_registration(server(None), "static-1", "configured-secret", REDIRECT)
    assert (static.auth_method, static.client_secret) == ("client_secret_basic", "configured-secret")


def test_client_id_metadata_document() -> None:
    server = AuthServer(issuer="https://as.example", authorization_endpoint="https://as.example/a",
                        token_endpoint="https://as.example/t", client_id_metadata_document_supported=True)  # fmt: skip
    url = "https://proxy.example.com/oauth/client.json"
    assert client_metadata_document(url, REDIRECT, "Keybearer") == {
        "client_id": url,
        "client_name": "Keybearer",
        "redirect_uris": [REDIRECT],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    reg = cimd_registration(url, server, REDIRECT)
    assert (reg.client_id, reg.client_secret, reg.auth_method, reg.source, reg.issuer) == (
        url, None, "none", "cimd", "https://as.example")  # fmt: skip
    with pytest.raises(ValueError, match="does not support Client ID Metadata Documents"):
        cimd_registration(url, AuthServer("https://as.example", "https://as.example/a", "https://as.example/t"),
                          REDIRECT)  # fmt: skip
    for bad in (
        "http://proxy.example.com/client.json",
        "https://proxy.example.com",
        "https://proxy.example.com/",
    ):
        with pytest.raises(ValueError, match="https with a path"):
            cimd_registration(bad, server, REDIRECT)


# -- the authorization request ----------------------------------------------------------


def test_pkce_pair() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert set(verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == expected
    assert pkce_pair()[0] != verifier


def test_authorization_url() -> None:
    server = AuthServer(issuer="https://as.example", authorization_endpoint="https://as.example/authorize?tenant=t1",
                        token_endpoint="https://as.example/token")  # fmt: skip
    url = authorization_url(server, "client 1", REDIRECT, "st@te", "chal", ["files:read", "user"],
                            "https://mcp.example.com/mcp", {"prompt": "consent"})  # fmt: skip
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "as.example", "/authorize")
    assert "+" not in parts.query  # spaces as %20
    assert parse_qs(parts.query) == {
        "tenant": ["t1"],
        "response_type": ["code"],
        "client_id": ["client 1"],
        "redirect_uri": [REDIRECT],
        "state": ["st@te"],
        "code_challenge": ["chal"],
        "code_challenge_method": ["S256"],
        "scope": ["files:read user"],
        "resource": ["https://mcp.example.com/mcp"],
        "prompt": ["consent"],
    }
    bare = parse_qs(urlsplit(authorization_url(server, "c", REDIRECT, "s", "ch", [], None, {})).query)
    assert "scope" not in bare and "resource" not in bare
    for clash in ("state", "resource", "Redirect_URI", "code_challenge_method"):
        with pytest.raises(ValueError, match="set by the protocol"):
            authorization_url(server, "c", REDIRECT, "s", "ch", [], None, {clash: "x"})


def test_authorization_url_offline_access_asks_for_consent() -> None:
    server = AuthServer("https://as.example", "https://as.example/authorize", "https://as.example/token")

    def query(scopes: list[str], extra: dict[str, str]) -> dict[str, list[str]]:
        return parse_qs(
            urlsplit(authorization_url(server, "c", REDIRECT, "s", "ch", scopes, None, extra)).query
        )

    assert query(["mcp", "offline_access"], {})["prompt"] == ["consent"]
    assert query(["mcp", "offline_access"], {"prompt": "login consent"})["prompt"] == ["login consent"]
    assert "prompt" not in query(["mcp"], {})


def test_callback_issuer_check() -> None:
    plain = AuthServer("https://as.example", "https://as.example/a", "https://as.example/t")
    strict = AuthServer("https://as.example", "https://as.example/a", "https://as.example/t",
                        authorization_response_iss_parameter_supported=True)  # fmt: skip
    check_callback_issuer(plain, None)
    check_callback_issuer(plain, "https://as.example")
    check_callback_issuer(strict, "https://as.example")
    with pytest.raises(OAuthError, match="no iss"):
        check_callback_issuer(strict, None)
    with pytest.raises(OAuthError, match="evil"):
        check_callback_issuer(plain, "https://evil.example")


# -- the token endpoint ----------------------------------------------------------------

TOKENS = {"access_token": "at-123456", "token_type": "bearer", "expires_in": 3600,
          "refresh_token": "rt-654321", "scope": "mcp read"}  # fmt: skip


def client_for(site: Site, method: str, secret: str | None = "s3cret/+=&x") -> ClientRegistration:
    return ClientRegistration(client_id="client:1", client_secret=secret if method != "none" else None,
                              auth_method=method, issuer=site.url, redirect_uri=REDIRECT, source="static",
                              raw={})  # fmt: skip


async def test_exchange_code_basic(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/token", TOKENS, method="POST")
    tokens = await exchange_code(fetcher, auth_server_for(asrv), client_for(asrv, "client_secret_basic"),
                                 "code-abc", REDIRECT, "verifier-xyz", "https://mcp.example.com/mcp")  # fmt: skip
    assert (tokens.access_token, tokens.token_type, tokens.expires_in, tokens.refresh_token, tokens.scope) == (
        "at-123456", "Bearer", 3600, "rt-654321", ("mcp", "read"))  # fmt: skip
    seen = asrv.seen[0]
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen.form == {"grant_type": "authorization_code", "code": "code-abc", "redirect_uri": REDIRECT,
                         "code_verifier": "verifier-xyz", "resource": "https://mcp.example.com/mcp"}  # fmt: skip
    scheme, _, credentials = seen.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    # RFC 6749 §2.3.1: form-urlencoded, then Basic.
    assert base64.b64decode(credentials).decode() == "client%3A1:s3cret%2F%2B%3D%26x"
    assert "at-123456" not in repr(tokens) and "rt-654321" not in repr(tokens)


async def test_exchange_code_post_and_none(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/token", TOKENS, method="POST")
    server = auth_server_for(asrv)
    await exchange_code(fetcher, server, client_for(asrv, "client_secret_post"), "c", REDIRECT, "v", None)
    await exchange_code(fetcher, server, client_for(asrv, "none"), "c", REDIRECT, "v", "https://r.example")
    post, public = asrv.seen
    assert "authorization" not in post.headers
    assert post.form == {"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT,
                         "code_verifier": "v", "client_id": "client:1", "client_secret": "s3cret/+=&x"}  # fmt: skip
    assert "authorization" not in public.headers
    assert public.form == {"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT,
                           "code_verifier": "v", "resource": "https://r.example", "client_id": "client:1"}  # fmt: skip


async def test_refresh_request(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/token", {"access_token": "at-2", "token_type": "Bearer", "expires_in": "60"}, method="POST")
    tokens = await refresh(fetcher, auth_server_for(asrv), client_for(asrv, "client_secret_post"),
                           "rt-old-1", "https://mcp.example.com/mcp", ("mcp", "write"))  # fmt: skip
    assert (tokens.access_token, tokens.expires_in, tokens.refresh_token, tokens.scope) == (
        "at-2",
        60,
        None,
        None,
    )
    assert asrv.seen[0].form == {"grant_type": "refresh_token", "refresh_token": "rt-old-1",
                                 "resource": "https://mcp.example.com/mcp", "scope": "mcp write",
                                 "client_id": "client:1", "client_secret": "s3cret/+=&x"}  # fmt: skip


async def test_revoke(asrv: Site, fetcher: Fetcher) -> None:
    asrv.on("/revoke", lambda r: _response(Response(status_code=200)), "POST")
    assert await revoke(fetcher, auth_server_for(asrv), client_for(asrv, "client_secret_basic"),
                        "rt-1234", "refresh_token")  # fmt: skip
    seen = asrv.seen[0]
    assert seen.form == {"token": "rt-1234", "token_type_hint": "refresh_token"}
    assert seen.headers["authorization"].startswith("Basic ")
    assert not await revoke(fetcher, auth_server_for(asrv, revocation_endpoint=None),
                            client_for(asrv, "none"), "rt-1234", "refresh_token")  # fmt: skip
    assert len(asrv.seen) == 1
    asrv.json("/revoke", {"error": "unsupported_token_type"}, status=400, method="POST")
    with pytest.raises(OAuthError) as info:
        await revoke(fetcher, auth_server_for(asrv), client_for(asrv, "none"), "rt-1234", "refresh_token")
    assert info.value.error == "unsupported_token_type"


async def test_invalid_grant_is_an_oauth_error_without_secrets(asrv: Site, fetcher: Fetcher) -> None:
    asrv.json("/token", {"error": "invalid_grant",
                         "error_description": "refresh token rt-secret-777 expired; client s3cret/+=&x"},
              status=400, method="POST")  # fmt: skip
    with pytest.raises(OAuthError) as info:
        await refresh(fetcher, auth_server_for(asrv), client_for(asrv, "client_secret_basic"),
                      "rt-secret-777", None)  # fmt: skip
    assert (info.value.error, info.value.http_status) == ("invalid_grant", 400)
    assert "rt-secret-777" not in str(info.value) and "s3cret" not in str(info.value)
    assert "[redacted]" in str(info.value)


async def test_token_endpoint_failures(asrv: Site, fetcher: Fetcher) -> None:
    server, client = auth_server_for(asrv), client_for(asrv, "none")
    for status in (503, 500, 429):
        asrv.json("/token", {"error": "temporarily_unavailable"}, status=status, method="POST")
        with pytest.raises(AuthServerUnavailable, match=f"HTTP {status}"):
            await refresh(fetcher, server, client, "rt-1", None)
    asrv.on("/token", lambda r: _response(Response("<h1>Bad</h1>", 400, media_type="text/html")), "POST")
    with pytest.raises(OAuthError) as info:
        await refresh(fetcher, server, client, "rt-1", None)
    assert (info.value.error, info.value.http_status) == ("invalid_response", 400)
    asrv.json("/token", {"error": "invalid_client"}, status=401, method="POST")
    with pytest.raises(OAuthError) as info:
        await exchange_code(fetcher, server, client, "code-1", REDIRECT, "v-1", None)
    assert info.value.error == "invalid_client"
    for bad in ({"token_type": "Bearer"}, {"access_token": "a", "token_type": "mac"}, {"access_token": "a"}):
        asrv.json("/token", bad, method="POST")
        with pytest.raises(OAuthError) as info:
            await exchange_code(fetcher, server, client, "code-1", REDIRECT, "v-1", None)
        assert info.value.error == "invalid_response"


async def test_token_endpoint_hang_and_down(asrv: Site) -> None:
    async def hang(request: Request) -> Response:
        await asyncio.sleep(5)
        return JSONResponse(TOKENS)

    asrv.on("/token", hang, "POST")
    async with Fetcher(allow_http_loopback=True, allow_private=False, timeout=0.5) as f:
        started = time.monotonic()
        with pytest.raises(AuthServerUnavailable, match=r"did not answer within 0\.5 s"):
            await refresh(f, auth_server_for(asrv), client_for(asrv, "none"), "rt-1", None)
        assert time.monotonic() - started < 2
        down = AuthServer(asrv.url, asrv.url + "/a", f"http://127.0.0.1:{free_port()}/token")
        with pytest.raises(AuthServerUnavailable, match="could not be reached"):
            await refresh(f, down, client_for(asrv, "none"), "rt-1", None)


async def test_unsafe_token_endpoint(fetcher: Fetcher) -> None:
    server = AuthServer("https://as.example", "https://as.example/a", "http://as.example/token")
    reg = ClientRegistration("c", None, "none", "https://as.example", REDIRECT, "static", {})
    with pytest.raises(OAuthError) as info:
        await refresh(fetcher, server, reg, "rt-1", None)
    assert info.value.error == "unsafe_url"
