"""Finding an MCP server's authorization server, as MCP 2025-11-25 asks of a client.

1. Protected resource metadata (RFC 9728): from the `resource_metadata` URL of
   the server's 401 challenge, else the path-aware well-known URL, else the
   root one. Its `resource` must name the server.
2. Authorization server metadata (RFC 8414, OpenID Connect Discovery) for the
   first listed authorization server, at the well-known URLs in the spec's
   order, with an exact issuer check and PKCE S256 required.
3. Servers without protected resource metadata (the 2025-03-26 revision): the
   MCP server's origin is the authorization server; its own metadata if it has
   some (naming an issuer on that origin, a path allowed), else the default
   endpoints `/authorize`, `/token`, `/register`.

Every failure is a `DiscoveryError` whose message names the URL and what was
wrong, fit to show an operator.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .fetch import Fetcher, FetchError, OAuthProtocolError, UnsafeURL

PROTOCOL_VERSION = "2025-11-25"
PRM_WELL_KNOWN = "/.well-known/oauth-protected-resource"
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"
OIDC_WELL_KNOWN = "/.well-known/openid-configuration"


class DiscoveryError(OAuthProtocolError):
    """Discovery failed; the message says where and why. `transient` is true
    when the failure was the network or a 5xx, so trying later may work."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# -- WWW-Authenticate ------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """The Bearer challenge of a 401 or 403 (RFC 6750 §3, RFC 9728 §5.1)."""

    resource_metadata: str | None = None
    scope: tuple[str, ...] = ()
    error: str | None = None
    error_description: str | None = None
    # Every parameter, names lowercased, including any not named above.
    params: Mapping[str, str] = field(default_factory=dict, hash=False)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(,|$))")
_PARAM_RE = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*")
# A bare value is a token; tolerate the unquoted URLs some servers send.
_BARE_RE = re.compile(r'[^\s,"]+')
_QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)


def parse_www_authenticate(header: str | Sequence[str] | None) -> Challenge | None:
    """The first Bearer challenge in one or more WWW-Authenticate values, or None.

    Follows RFC 9110 §11.6.1: several challenges may share one header value,
    separated by commas like their parameters; values are tokens or quoted
    strings with backslash escapes.
    """
    if header is None:
        return None
    text = header if isinstance(header, str) else ", ".join(header)
    for scheme, params in _challenges(text):
        if scheme.lower() == "bearer":
            scope = params.get("scope")
            return Challenge(
                resource_metadata=params.get("resource_metadata") or None,
                scope=tuple(scope.split()) if scope else (),
                error=params.get("error") or None,
                error_description=params.get("error_description") or None,
                params=params,
            )
    return None


def _challenges(text: str) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    pos, end = 0, len(text)
    while pos < end:
        pos = _skip(text, pos, " \t,")  # empty list elements
        scheme = _TOKEN_RE.match(text, pos)
        if scheme is None:
            break  # not a challenge: give up on the rest
        pos = scheme.end()
        params: dict[str, str] = {}
        out.append((scheme.group(), params))
        if pos < end and text[pos] not in " \t,":
            break  # junk glued to the scheme name
        pos = _skip(text, pos, " \t")
        token68 = _TOKEN68_RE.match(text, pos)
        if token68 is not None:
            params[""] = token68.group()
            pos = token68.end()
            continue
        # auth-params until the next challenge: a token not followed by "=".
        while pos < end:
            pos = _skip(text, pos, " \t,")
            param = _PARAM_RE.match(text, pos)
            if param is None:
                break
            name, pos = param.group(1).lower(), param.end()
            quoted = _QUOTED_RE.match(text, pos)
            if quoted is not None:
                value = re.sub(r"\\(.)", r"\1", quoted.group(1), flags=re.DOTALL)
                pos = quoted.end()
            else:
                bare = _BARE_RE.match(text, pos)
                value = bare.group() if bare else ""
                pos = bare.end() if bare else pos
            params.setdefault(name, value)
            # What follows the comma is another parameter or the next challenge.
            pos = _skip(text, pos, " \t")
            if pos < end and text[pos] != ",":
                # Garbage after a value: skip to the next comma.
                comma = text.find(",", pos)
                pos = end if comma < 0 else comma
    return out


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


# -- the canonical server URI ----------------------------------------------


def canonical_resource(url: str) -> str:
    """The MCP canonical server URI (RFC 8707 §2, MCP "Canonical Server URI"):
    lowercase scheme and host, no default port, no fragment, the path kept but
    without a trailing slash (so the origin alone has no path at all), the
    query kept. Raises ValueError for what is not an absolute http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r} must not carry credentials")
    host = parts.hostname  # lowercased by urlsplit
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, host, path, parts.query, ""))


def resource_covers(resource: str, server_url: str) -> bool:
    """Whether a protected resource metadata `resource` names the server: its
    canonical URI, or a parent of it on the same origin (a path prefix ending
    at a segment boundary), which is what the official MCP SDKs accept and what
    a root-level metadata document names (RFC 9728 §3.3)."""
    try:
        declared, actual = canonical_resource(resource), canonical_resource(server_url)
    except ValueError:
        return False
    if declared == actual:
        return True
    d, a = urlsplit(declared), urlsplit(actual)
    if (d.scheme, d.netloc) != (a.scheme, a.netloc) or d.query:
        return False
    return a.path.startswith(d.path + "/")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


# -- probing the server for its challenge -----------------------------------


_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "keybearer", "version": "0.1.0"},
    },
}
# Servers may answer discovery by protocol version (MCP 2025-03-26 §2.3.1).
_PRM_HEADERS = {"MCP-Protocol-Version": PROTOCOL_VERSION}
_PROBE_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
}


async def probe_challenge(fetcher: Fetcher, server_url: str) -> Challenge | None:
    """POST an unauthenticated MCP `initialize` to the server and return the
    challenge of its 401 (an empty Challenge when the 401 carries no Bearer
    challenge), or None when it did not answer 401. The URL is checked like any
    discovered URL. Network failures raise DiscoveryError.
    """
    body = json.dumps(_INITIALIZE).encode()
    try:
        status, headers = await fetcher.send("POST", server_url, headers=_PROBE_HEADERS, data=body)
    except UnsafeURL as exc:
        raise DiscoveryError(f"MCP server URL refused: {exc}") from None
    except FetchError as exc:
        raise DiscoveryError(f"MCP server: {exc.message}", transient=exc.transient) from None
    if status != 401:
        session_id = headers.get("Mcp-Session-Id")
        if session_id and 200 <= status < 300:
            await _end_session(fetcher, server_url, session_id)
        return None
    return parse_www_authenticate(headers.getall("WWW-Authenticate", [])) or Challenge()


async def _end_session(fetcher: Fetcher, url: str, session_id: str) -> None:
    """The probe opened a session on a server that did not want a token: close it."""
    headers = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROTOCOL_VERSION}
    with contextlib.suppress(FetchError, UnsafeURL):
        await fetcher.send("DELETE", url, headers=headers)


# -- metadata ---------------------------------------------------------------


@dataclass(frozen=True)
class AuthServer:
    """What the proxy uses of an authorization server's metadata."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None = None
    revocation_endpoint: str | None = None
    scopes_supported: tuple[str, ...] | None = None
    # None when absent: RFC 8414 then means client_secret_basic.
    token_endpoint_auth_methods_supported: tuple[str, ...] | None = None
    code_challenge_methods_supported: tuple[str, ...] = ("S256",)
    client_id_metadata_document_supported: bool = False
    authorization_response_iss_parameter_supported: bool = False
    # The metadata document as fetched; empty when the endpoints are the
    # 2025-03-26 defaults because the server published no metadata.
    raw: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # Where the metadata came from (None for the defaults).
    metadata_url: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Discovery:
    """Everything discovery learnt about one MCP server.

    `resource` is what goes into the RFC 8707 `resource` parameter: the
    `resource` the server's metadata declares (checked to name the server), or
    the server URL's canonical form when it published no metadata.
    """

    resource: str
    resource_metadata: Mapping[str, Any] | None
    auth_server: AuthServer
    scopes: tuple[str, ...] = ()
    resource_metadata_url: str | None = None


async def discover(fetcher: Fetcher, server_url: str, challenge: Challenge | None = None) -> Discovery:
    """Discover the authorization server of the MCP server at `server_url`."""
    try:
        canonical = canonical_resource(server_url)
    except ValueError as exc:
        raise DiscoveryError(f"MCP server URL: {exc}") from None
    prm, prm_url = await _protected_resource_metadata(fetcher, server_url, challenge)
    challenge_scopes = challenge.scope if challenge is not None else ()
    if prm is None:
        auth_server = await _legacy_auth_server(fetcher, server_url)
        return Discovery(resource=canonical, resource_metadata=None, auth_server=auth_server,
                         scopes=challenge_scopes)  # fmt: skip
    assert prm_url is not None
    resource = prm.get("resource")
    if not isinstance(resource, str) or not resource:
        raise DiscoveryError(f"protected resource metadata at {prm_url} has no `resource`")
    if not resource_covers(resource, server_url):
        raise DiscoveryError(
            f"protected resource metadata at {prm_url} is for resource {resource!r}, "
            f"not for the MCP server {canonical!r}; refusing to use it"
        )
    servers = prm.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not all(isinstance(s, str) and s for s in servers):
        raise DiscoveryError(f"protected resource metadata at {prm_url} lists no `authorization_servers`")
    auth_server = await fetch_auth_server(fetcher, servers[0])
    scopes = challenge_scopes or _string_tuple(prm.get("scopes_supported")) or ()
    return Discovery(resource=resource, resource_metadata=prm, auth_server=auth_server,
                     scopes=scopes, resource_metadata_url=prm_url)  # fmt: skip


def protected_resource_metadata_urls(server_url: str) -> list[str]:
    """RFC 9728 §3.1 well-known URLs for a server, path-aware first."""
    parts = urlsplit(server_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    urls = []
    if path or parts.query:
        urls.append(origin + PRM_WELL_KNOWN + path + (f"?{parts.query}" if parts.query else ""))
    urls.append(origin + PRM_WELL_KNOWN)
    return urls


async def _protected_resource_metadata(
    fetcher: Fetcher, server_url: str, challenge: Challenge | None
) -> tuple[dict[str, Any] | None, str | None]:
    if challenge is not None and challenge.resource_metadata:
        url = challenge.resource_metadata
        try:
            return await fetcher.get_json(url, _PRM_HEADERS), url
        except UnsafeURL as exc:
            raise DiscoveryError(f"resource_metadata URL from the server's 401 refused: {exc}") from None
        except FetchError as exc:
            raise DiscoveryError(
                f"protected resource metadata named by the server's 401: {exc.message}",
                transient=exc.transient,
            ) from None
    found = await _first_json(
        fetcher, protected_resource_metadata_urls(server_url), "MCP server", _PRM_HEADERS
    )
    return found if found is not None else (None, None)


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """The well-known metadata URLs for an issuer, in the MCP spec's order."""
    parts = urlsplit(issuer)
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    if path:
        return [
            origin + OAUTH_WELL_KNOWN + path,
            origin + OIDC_WELL_KNOWN + path,
            origin + path + OIDC_WELL_KNOWN,
        ]
    return [origin + OAUTH_WELL_KNOWN, origin + OIDC_WELL_KNOWN]


async def fetch_auth_server(fetcher: Fetcher, issuer: str) -> AuthServer:
    """Fetch and validate the metadata of the authorization server `issuer`."""
    try:
        fetcher.check_url(issuer)
    except UnsafeURL as exc:
        raise DiscoveryError(f"authorization server refused: {exc}") from None
    parts = urlsplit(issuer)
    if parts.query or parts.fragment:
        raise DiscoveryError(f"authorization server {issuer!r} is not a valid issuer (query or fragment)")
    misses: list[str] = []
    found = await _first_json(
        fetcher, authorization_server_metadata_urls(issuer), f"authorization server {issuer}", None, misses
    )
    if found is None:
        raise DiscoveryError(
            f"authorization server {issuer} publishes no metadata (RFC 8414 or OpenID): " + "; ".join(misses)
        )
    metadata, url = found
    return auth_server_from_metadata(fetcher, metadata, url, expected_issuers=(issuer,))


def auth_server_from_metadata(
    fetcher: Fetcher, metadata: Mapping[str, Any], url: str, *, expected_issuers: Sequence[str]
) -> AuthServer:
    """Validate authorization server metadata fetched from `url`."""
    issuer = metadata.get("issuer")
    if issuer not in expected_issuers:
        raise DiscoveryError(
            f"authorization server metadata at {url} names issuer {issuer!r}, "
            f"but it must be exactly {expected_issuers[0]!r}; refusing it"
        )
    assert isinstance(issuer, str)
    where = f"authorization server {issuer} (metadata at {url})"
    methods = _string_tuple(metadata.get("code_challenge_methods_supported"))
    if methods is None or "S256" not in methods:
        listed = "does not list code_challenge_methods_supported" if methods is None else (
            f"lists code_challenge_methods_supported {list(methods)}"
        )  # fmt: skip
        raise DiscoveryError(
            f"{where} {listed}: it does not advertise PKCE with S256, "
            "and the MCP authorization spec requires clients to refuse such a server"
        )
    response_types = _string_tuple(metadata.get("response_types_supported"))
    if response_types is not None and "code" not in response_types:
        raise DiscoveryError(f"{where} does not support response_type=code")
    grant_types = _string_tuple(metadata.get("grant_types_supported"))
    if grant_types is not None and "authorization_code" not in grant_types:
        raise DiscoveryError(f"{where} does not support the authorization_code grant")
    endpoints: dict[str, str | None] = {}
    for name in ("authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint"):
        value = metadata.get(name)
        if value is None and name in ("registration_endpoint", "revocation_endpoint"):
            endpoints[name] = None
            continue
        endpoints[name] = checked_endpoint(fetcher, metadata, name, where)
    auth_methods = _string_tuple(metadata.get("token_endpoint_auth_methods_supported"))
    return AuthServer(
        issuer=issuer,
        authorization_endpoint=endpoints["authorization_endpoint"] or "",
        token_endpoint=endpoints["token_endpoint"] or "",
        registration_endpoint=endpoints["registration_endpoint"],
        revocation_endpoint=endpoints["revocation_endpoint"],
        scopes_supported=_string_tuple(metadata.get("scopes_supported")),
        token_endpoint_auth_methods_supported=auth_methods,
        code_challenge_methods_supported=methods,
        client_id_metadata_document_supported=metadata.get("client_id_metadata_document_supported") is True,
        authorization_response_iss_parameter_supported=(
            metadata.get("authorization_response_iss_parameter_supported") is True
        ),
        raw=dict(metadata),
        metadata_url=url,
    )


async def _legacy_auth_server(fetcher: Fetcher, server_url: str) -> AuthServer:
    """MCP 2025-03-26: no protected resource metadata, so the server's origin
    is the authorization server: its metadata, else the default endpoints."""
    origin = _origin(server_url)
    found = await _first_json(
        fetcher, authorization_server_metadata_urls(origin), f"MCP server {origin} (2025-03-26 fallback)"
    )
    if found is not None:
        metadata, url = found
        issuer = metadata.get("issuer")
        # The origin's document may name an issuer with a path (a tenant) on
        # that same origin: whoever serves the origin speaks for its paths.
        # Another origin it may not name: that is what the issuer check stops.
        if not isinstance(issuer, str) or _origin(issuer) != origin or "?" in issuer or "#" in issuer:
            raise DiscoveryError(
                f"authorization server metadata at {url} names issuer {issuer!r}, which is not on the "
                f"MCP server's origin {origin}; a server without protected resource metadata (MCP "
                "2025-03-26) is its own authorization server, so refusing it"
            )
        return auth_server_from_metadata(fetcher, metadata, url, expected_issuers=(issuer,))
    # No metadata at all: the default endpoints. PKCE cannot be checked; the
    # 2025-03-26 revision required it of every server.
    return AuthServer(
        issuer=origin,
        authorization_endpoint=origin + "/authorize",
        token_endpoint=origin + "/token",
        registration_endpoint=origin + "/register",
    )


async def _first_json(
    fetcher: Fetcher,
    urls: Sequence[str],
    what: str,
    headers: Mapping[str, str] | None = None,
    misses: list[str] | None = None,
) -> tuple[dict[str, Any], str] | None:
    """The first of `urls` that answers with a JSON object. Answers that say
    "not here" (4xx, a redirect, not JSON) move on to the next URL and are
    noted in `misses`; network trouble and 5xx stop discovery, so that a
    passing outage cannot make it settle on a fallback."""
    for url in urls:
        try:
            return await fetcher.get_json(url, headers), url
        except UnsafeURL as exc:
            raise DiscoveryError(f"{what}: {exc}") from None
        except FetchError as exc:
            if exc.transient:
                raise DiscoveryError(f"{what}: {exc.message}", transient=True) from None
            if misses is not None:
                misses.append(exc.message)
    return None


def _string_tuple(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return None


def checked_endpoint(fetcher: Fetcher, metadata: Mapping[str, Any], name: str, where: str) -> str:
    """An endpoint a metadata document must name, and the fetcher must accept."""
    value = metadata.get(name)
    if not isinstance(value, str) or not value:
        raise DiscoveryError(f"{where} has no {name}")
    try:
        fetcher.check_url(value)
    except UnsafeURL as exc:
        raise DiscoveryError(f"{where}: {name} refused: {exc}") from None
    return value
