"""The OAuth 2.1 client side: PKCE, the authorization URL, client registration
(static, Client ID Metadata Document, RFC 7591 dynamic registration), client
authentication (a secret, or an RFC 7523 assertion signed with a private key),
and the token endpoint (code exchange, refresh, client credentials, RFC 7009
revocation).

Errors:
- `OAuthError` when the authorization server answered but not with what was
  asked for: its OAuth error (`.error` is `invalid_grant`, `invalid_client`, …)
  or one of Keybearer's own codes: `invalid_response` (a malformed answer),
  `unsafe_url` (an endpoint the fetcher refused), `registration_not_supported`,
  `unsupported_auth_method`, `registration_incomplete` (a registration answer
  without what sign-in needs). Only `invalid_grant` means the grant is gone.
- `AuthServerUnavailable` for 5xx, 429, timeouts and network trouble: the
  caller keeps what it has stored and tries later.

No secret (client secret, code, verifier, tokens) ever goes into a message.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from .discovery import AuthServer
from .fetch import Fetcher, FetchError, OAuthProtocolError, UnsafeURL

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
RegistrationSource = Literal["static", "cimd", "dcr"]

GRANT_TYPES = ("authorization_code", "refresh_token")
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
# OpenID Connect §11 and the providers that follow it (Okta, Auth0, Entra ID):
# no refresh token unless this scope is asked for.
OFFLINE_ACCESS = "offline_access"
# Parameters the protocol sets; configured extras may not replace them.
PROTOCOL_PARAMS = frozenset(
    {
        "response_type", "client_id", "redirect_uri", "state", "code_challenge",
        "code_challenge_method", "scope", "resource", "request", "request_uri",
    }
)  # fmt: skip
_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}")
# RFC 6749 A.12 and A.17: a token is printable ASCII. Anything else (a line
# break above all) cannot be sent in an Authorization header.
_TOKEN_CHARS = re.compile(r"[\x20-\x7E]+")
# A lifetime in seconds; longer than 10**12 s (30,000 years) means "unknown".
_SECONDS = re.compile(r"[0-9]{1,12}")
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# A client assertion is sent at once; the authorization server remembers its
# jti until it expires, so a short life keeps that memory small too.
ASSERTION_LIFETIME = 60
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class OAuthError(OAuthProtocolError):
    """The authorization server refused, or answered with something unusable."""

    def __init__(self, error: str, description: str | None = None, http_status: int | None = None) -> None:
        text = error if not description else f"{error}: {description}"
        super().__init__(text if http_status is None else f"{text} (HTTP {http_status})")
        self.error = error
        self.description = description
        self.http_status = http_status


class AuthServerUnavailable(OAuthProtocolError):
    """The authorization server could not be reached or failed (5xx, timeout)."""

    status = 503
    code = "authorization_server_unavailable"


# -- PKCE and the authorization request ---------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (86 URL-safe characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    auth_server: AuthServer,
    client_id: str,
    redirect_uri: str,
    state: str,
    code_challenge: str,
    scopes: Sequence[str],
    resource: str | None,
    extra_params: Mapping[str, str] | None = None,
    *,
    consent_for_offline: bool = True,
) -> str:
    """The URL to send the browser to. A query already in the authorization
    endpoint is kept (RFC 6749 §3.1); `extra_params` (configured per server,
    e.g. `prompt`) may not name a protocol parameter: ValueError. Asking for
    `offline_access` adds `prompt=consent` unless `extra_params` set a prompt
    or `consent_for_offline` is False."""
    extra = dict(extra_params or {})
    clash = sorted(k for k in extra if k.lower() in PROTOCOL_PARAMS)
    if clash:
        raise ValueError(f"authorization parameter(s) {', '.join(clash)} are set by the protocol")
    params = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
    ]
    if scopes:
        params.append(("scope", " ".join(scopes)))
    if resource:
        params.append(("resource", resource))
    if consent_for_offline and OFFLINE_ACCESS in scopes and not any(k.lower() == "prompt" for k in extra):
        # OpenID Connect §11: offline access is granted on consent, which
        # providers (oidc-provider among them) insist on being asked for.
        params.append(("prompt", "consent"))
    params.extend(extra.items())
    parts = urlsplit(auth_server.authorization_endpoint)
    existing = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in dict(params)]
    query = urlencode(existing + params, quote_via=quote)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def check_callback_issuer(auth_server: AuthServer, iss: str | None) -> None:
    """RFC 9207: the `iss` of an authorization response must be the issuer;
    it must be present when the server says it sends it. OAuthError if not."""
    if iss is None:
        if auth_server.authorization_response_iss_parameter_supported:
            raise OAuthError(
                "invalid_response",
                f"the authorization response has no iss, which {auth_server.issuer} promises to send",
            )
        return
    if iss != auth_server.issuer:
        raise OAuthError(
            "invalid_response",
            f"the authorization response comes from issuer {iss[:200]!r}, not {auth_server.issuer!r}",
        )


# -- client registration ------------------------------------------------------


@dataclass(frozen=True)
class AssertionKey:
    """The private key of a client that authenticates by private_key_jwt
    (RFC 7523 §2.2): each token request carries a fresh assertion signed with it."""

    key: RSAKey | ECKey = field(repr=False)
    algorithm: str
    key_id: str | None = None
    # What the assertion's `aud` names: the token endpoint (RFC 7523 §3, what
    # most providers check) or the issuer (what RFC 7523bis asks for).
    audience: Literal["token_endpoint", "issuer"] = "token_endpoint"

    @classmethod
    def from_pem(
        cls,
        pem: str,
        key_id: str | None = None,
        audience: Literal["token_endpoint", "issuer"] = "token_endpoint",
    ) -> AssertionKey:
        """ValueError, saying what is wrong, unless `pem` is an unencrypted RSA
        (RS256) or EC P-256/384/521 (ES256/384/512) private key."""
        try:
            loaded = load_pem_private_key(pem.encode(), password=None)
        except TypeError:
            raise ValueError(
                "the private key is encrypted; give it unencrypted (PKCS#8 or PKCS#1 PEM)"
            ) from None
        except ValueError:
            raise ValueError("not a PEM private key (-----BEGIN PRIVATE KEY----- …)") from None
        if isinstance(loaded, rsa.RSAPrivateKey):
            if loaded.key_size < 2048:
                raise ValueError(f"the RSA key has {loaded.key_size} bits; at least 2048 are needed")
            return cls(RSAKey.import_key(pem), "RS256", key_id, audience)
        if isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name in _EC_ALGORITHMS:
            return cls(ECKey.import_key(pem), _EC_ALGORITHMS[loaded.curve.name], key_id, audience)
        raise ValueError("the key must be RSA or EC on P-256, P-384 or P-521")


def client_assertion(client_id: str, key: AssertionKey, auth_server: AuthServer) -> str:
    """A JWT that authenticates the client (RFC 7523 §3): issued by and about
    the client, for this authorization server alone, used once, short-lived."""
    now = int(time.time())
    audience = auth_server.issuer if key.audience == "issuer" else auth_server.token_endpoint
    header = {"alg": key.algorithm, "typ": "JWT", **({"kid": key.key_id} if key.key_id else {})}
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(24),
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
    }
    return jwt.encode(header, claims, key.key, algorithms=[key.algorithm])


@dataclass(frozen=True)
class ClientRegistration:
    """The client the proxy is at one authorization server."""

    client_id: str
    client_secret: str | None = field(repr=False)
    auth_method: str
    issuer: str
    redirect_uri: str
    source: RegistrationSource
    # When the client secret stops working (RFC 7591 client_secret_expires_at);
    # None when it never does.
    secret_expires_at: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    # Set for private_key_jwt (static clients of the client_credentials grant).
    assertion_key: AssertionKey | None = field(default=None, repr=False)


def choose_auth_method(auth_server: AuthServer, has_secret: bool) -> AuthMethod:
    """How a client authenticates at the token endpoint. Without a secret:
    `none`. With one: `client_secret_basic`, else `client_secret_post`, else
    `none` (the secret unused: a public client with PKCE), among what the
    server lists (client_secret_basic when it lists nothing, RFC 8414 §2).
    OAuthError `unsupported_auth_method` when none of them is listed."""
    if not has_secret:
        return "none"
    supported = auth_server.token_endpoint_auth_methods_supported or ("client_secret_basic",)
    for method in (*SECRET_METHODS, "none"):
        if method in supported:
            return cast(AuthMethod, method)
    raise OAuthError(
        "unsupported_auth_method",
        f"{auth_server.issuer} accepts client authentication only by {', '.join(supported)}; "
        "the proxy supports client_secret_basic, client_secret_post and none",
    )


def static_registration(
    auth_server: AuthServer, client_id: str, client_secret: str | None, redirect_uri: str
) -> ClientRegistration:
    """A client configured by the operator."""
    method = choose_auth_method(auth_server, bool(client_secret))
    return ClientRegistration(
        client_id=client_id,
        client_secret=client_secret if method in SECRET_METHODS else None,
        auth_method=method,
        issuer=auth_server.issuer,
        redirect_uri=redirect_uri,
        source="static",
    )


def key_registration(auth_server: AuthServer, client_id: str, key: AssertionKey) -> ClientRegistration:
    """A static client that authenticates with a private key (private_key_jwt).
    OAuthError `unsupported_auth_method` when the server lists its methods
    without that one."""
    supported = auth_server.token_endpoint_auth_methods_supported
    if supported is not None and "private_key_jwt" not in supported:
        raise OAuthError(
            "unsupported_auth_method",
            f"{auth_server.issuer} accepts client authentication only by {', '.join(supported)}, "
            "not private_key_jwt",
        )
    return ClientRegistration(
        client_id=client_id,
        client_secret=None,
        auth_method="private_key_jwt",
        issuer=auth_server.issuer,
        redirect_uri="",
        source="static",
        assertion_key=key,
    )


async def register_client(
    fetcher: Fetcher,
    auth_server: AuthServer,
    redirect_uri: str,
    client_name: str,
    scopes: Sequence[str] = (),
) -> ClientRegistration:
    """RFC 7591 dynamic client registration."""
    if not auth_server.registration_endpoint:
        raise OAuthError(
            "registration_not_supported",
            f"{auth_server.issuer} offers no dynamic client registration; "
            "configure a client_id (and secret) for this server",
        )
    # Asked as if a secret were coming; what the answer says decides.
    method = choose_auth_method(auth_server, has_secret=True)
    body: dict[str, Any] = {
        "redirect_uris": [redirect_uri],
        "client_name": client_name,
        "grant_types": list(GRANT_TYPES),
        "response_types": ["code"],
        "token_endpoint_auth_method": method,
    }
    if scopes:
        body["scope"] = " ".join(scopes)
    status, answer = await _call(
        fetcher.post_json(auth_server.registration_endpoint, body), "client registration", ()
    )
    if status not in (200, 201):
        raise _error(status, answer, "client registration", ())
    if answer is None:
        raise OAuthError("invalid_response", "the registration answer is not a JSON object", status)
    client_id = answer.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise OAuthError("invalid_response", "the registration answer has no client_id", status)
    _check_registered(auth_server, answer, redirect_uri, status)
    secret = answer.get("client_secret")
    secret = secret if isinstance(secret, str) and secret else None
    granted = _registered_method(auth_server, answer, method, secret is not None, status)
    return ClientRegistration(
        client_id=client_id,
        client_secret=secret if granted in SECRET_METHODS else None,
        auth_method=granted,
        issuer=auth_server.issuer,
        redirect_uri=redirect_uri,
        source="dcr",
        secret_expires_at=_secret_expiry(answer) if granted in SECRET_METHODS else None,
        raw=answer,
    )


def _check_registered(
    auth_server: AuthServer, answer: Mapping[str, Any], redirect_uri: str, status: int
) -> None:
    """RFC 7591 §3.2.1: the server may register less than was asked for. What
    it answers must still let a person sign in; a field left out was granted."""
    missing = []
    redirect_uris = answer.get("redirect_uris")
    if isinstance(redirect_uris, list) and redirect_uri not in redirect_uris:
        missing.append(f"the redirect URI {redirect_uri}")
    grant_types = answer.get("grant_types")
    if isinstance(grant_types, list) and "authorization_code" not in grant_types:
        missing.append("the authorization_code grant")
    response_types = answer.get("response_types")
    if isinstance(response_types, list) and "code" not in response_types:
        missing.append("the response type code")
    if missing:
        raise OAuthError(
            "registration_incomplete",
            f"{auth_server.issuer} registered the client without {' and '.join(missing)}, which signing "
            "in needs; the registration is not used. Ask its operator to allow them for dynamically "
            "registered clients, or configure a client_id (and secret) for this server",
            status,
        )


def _registered_method(
    auth_server: AuthServer, answer: Mapping[str, Any], asked: AuthMethod, has_secret: bool, status: int
) -> AuthMethod:
    """The client authentication the server registered (RFC 7591 lets it
    decide). Said outright, it wins; left out, it is what was asked for, or
    `none` when no secret came back. A secret for a `none` client is ignored."""
    granted = answer.get("token_endpoint_auth_method")
    if granted is None:
        return asked if has_secret else "none"
    if granted == "none":
        return "none"
    if granted not in SECRET_METHODS:
        raise OAuthError(
            "unsupported_auth_method",
            f"{auth_server.issuer} registered the client for {str(granted)[:64]!r} client authentication; "
            "the proxy supports client_secret_basic, client_secret_post and none",
            status,
        )
    if not has_secret:
        raise OAuthError(
            "registration_incomplete",
            f"{auth_server.issuer} registered the client for {granted} but issued no client_secret; "
            "the registration is not used",
            status,
        )
    return cast(AuthMethod, granted)


def _secret_expiry(answer: Mapping[str, Any]) -> float | None:
    """RFC 7591 `client_secret_expires_at`: seconds since the epoch, 0 for never."""
    value = answer.get("client_secret_expires_at")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 10**12:
        return None
    return float(value)


def requested_scopes(auth_server: AuthServer, scopes: Sequence[str]) -> tuple[str, ...]:
    """The scopes to ask for: `offline_access` joins them when the server lists
    it, since such servers issue refresh tokens only for it. Never on its own:
    asking for nothing but it would replace the server's default scopes."""
    if not scopes or OFFLINE_ACCESS not in (auth_server.scopes_supported or ()):
        return tuple(scopes)
    return tuple(dict.fromkeys((*scopes, OFFLINE_ACCESS)))


def cimd_usable(client_id_url: str, allow_http_loopback: bool = False) -> bool:
    try:
        _check_client_id_url(client_id_url, allow_http_loopback)
    except ValueError:
        return False
    return True


def _check_client_id_url(client_id_url: str, allow_http_loopback: bool = False) -> None:
    parts = urlsplit(client_id_url)
    # Plain http only to a loopback proxy, and only when the operator allows
    # http loopback for OAuth (tests): an authorization server must not fetch
    # a client's identity over an open network without TLS.
    scheme_ok = parts.scheme == "https" or (
        allow_http_loopback and parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")
    )
    if not scheme_ok or not parts.hostname or parts.path in ("", "/"):
        raise ValueError(
            f"a Client ID Metadata Document URL must be https with a path (got {client_id_url!r}); "
            "set public_url to the proxy's https address"
        )
    if parts.fragment or parts.username is not None or parts.password is not None:
        raise ValueError(f"{client_id_url!r} may have no fragment and no credentials")


def client_metadata_document(client_id_url: str, redirect_uri: str, client_name: str) -> dict[str, Any]:
    """The Client ID Metadata Document the proxy serves at `client_id_url`
    (whether an authorization server will accept it is checked when used)."""
    return {
        "client_id": client_id_url,
        "client_name": client_name,
        "redirect_uris": [redirect_uri],
        "grant_types": list(GRANT_TYPES),
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


def cimd_registration(
    client_id_url: str, auth_server: AuthServer, redirect_uri: str, allow_http_loopback: bool = False
) -> ClientRegistration:
    """The client an authorization server knows by the proxy's metadata
    document URL. ValueError unless the server supports such documents."""
    if not auth_server.client_id_metadata_document_supported:
        raise ValueError(f"{auth_server.issuer} does not support Client ID Metadata Documents")
    _check_client_id_url(client_id_url, allow_http_loopback)
    return ClientRegistration(
        client_id=client_id_url,
        client_secret=None,
        auth_method="none",
        issuer=auth_server.issuer,
        redirect_uri=redirect_uri,
        source="cimd",
    )


# -- the token endpoint --------------------------------------------------------


@dataclass(frozen=True)
class TokenResponse:
    access_token: str = field(repr=False)
    token_type: str
    expires_in: int | None
    # None when the server did not send one (a refresh then keeps the old one).
    refresh_token: str | None = field(repr=False)
    # None when the server did not say (the requested scopes were granted).
    scope: tuple[str, ...] | None
    raw: Mapping[str, Any] = field(hash=False, compare=False, repr=False)


async def exchange_code(
    fetcher: Fetcher,
    auth_server: AuthServer,
    client: ClientRegistration,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    resource: str | None,
) -> TokenResponse:
    """Redeem an authorization code (RFC 6749 §4.1.3, PKCE)."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
    }
    if resource:
        data["resource"] = resource
    return await _token_request(fetcher, auth_server, client, data, secrets_in=(code, code_verifier))


async def refresh(
    fetcher: Fetcher,
    auth_server: AuthServer,
    client: ClientRegistration,
    refresh_token: str,
    resource: str | None,
    scopes: Sequence[str] | None = None,
) -> TokenResponse:
    """Use a refresh token (RFC 6749 §6). The answer's refresh_token is None
    when the server kept the old one."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if resource:
        data["resource"] = resource
    if scopes:
        data["scope"] = " ".join(scopes)
    return await _token_request(fetcher, auth_server, client, data, secrets_in=(refresh_token,))


async def client_credentials(
    fetcher: Fetcher,
    auth_server: AuthServer,
    client: ClientRegistration,
    scopes: Sequence[str],
    resource: str | None,
) -> TokenResponse:
    """A token for the client itself (RFC 6749 §4.4): no user, no refresh token needed."""
    data = {"grant_type": "client_credentials"}
    if scopes:
        data["scope"] = " ".join(scopes)
    if resource:
        data["resource"] = resource
    return await _token_request(fetcher, auth_server, client, data, secrets_in=())


# The Identity Assertion JWT Authorization Grant (the MCP enterprise-managed
# authorization extension): an RFC 8693 token exchange at the organisation's
# identity provider turns the person's ID token into an ID-JAG, which the
# server's authorization server takes in an RFC 7523 JWT bearer grant.
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


async def exchange_id_token(
    fetcher: Fetcher,
    idp: AuthServer,
    client: ClientRegistration,
    id_token: str,
    audience: str,
    resource: str | None,
    scopes: Sequence[str],
) -> str:
    """An ID-JAG for `audience` (an authorization server's issuer), from the
    identity provider the ID token came from (RFC 8693)."""
    data = {
        "grant_type": TOKEN_EXCHANGE,
        "requested_token_type": ID_JAG,
        "audience": audience,
        "subject_token": id_token,
        "subject_token_type": ID_TOKEN,
    }
    if resource:
        data["resource"] = resource
    if scopes:
        data["scope"] = " ".join(scopes)
    what = "token exchange for an ID-JAG"
    form, headers = _authenticate(client, idp, data)
    status, answer = await _call(
        fetcher.post_form(idp.token_endpoint, form, headers=headers), what, (id_token,)
    )
    if not 200 <= status < 300:
        raise _error(status, answer, what, (id_token,), client)
    assertion = (answer or {}).get("access_token")
    # RFC 8693 §2.2.1: the issued token travels in access_token, its type beside it
    # (token_type is N_A: an ID-JAG is not an access token).
    if (answer or {}).get("issued_token_type") != ID_JAG or not isinstance(assertion, str) or not assertion:
        raise OAuthError("invalid_response", f"the answer to the {what} carries no ID-JAG", status)
    _check_token_chars("access_token", assertion, status)
    return assertion


async def jwt_bearer(
    fetcher: Fetcher,
    auth_server: AuthServer,
    client: ClientRegistration,
    assertion: str,
    scopes: Sequence[str],
) -> TokenResponse:
    """An access token for an ID-JAG (RFC 7523 §2.1), asked for as the client it names."""
    data = {"grant_type": JWT_BEARER, "assertion": assertion}
    if scopes:
        data["scope"] = " ".join(scopes)
    return await _token_request(fetcher, auth_server, client, data, secrets_in=(assertion,))


async def revoke(
    fetcher: Fetcher,
    auth_server: AuthServer,
    client: ClientRegistration,
    token: str,
    token_type_hint: str | None = None,
) -> bool:
    """RFC 7009 revocation. False when the server has no revocation endpoint."""
    if not auth_server.revocation_endpoint:
        return False
    data = {"token": token}
    if token_type_hint:
        data["token_type_hint"] = token_type_hint
    form, headers = _authenticate(client, auth_server, data)
    status, answer = await _call(
        fetcher.post_form(auth_server.revocation_endpoint, form, headers=headers),
        "token revocation",
        (token,),
    )
    if not 200 <= status < 300:
        raise _error(status, answer, "token revocation", (token,), client)
    return True


async def _token_request(
    fetcher: Fetcher,
    auth_server: AuthServer,
    client: ClientRegistration,
    data: dict[str, str],
    *,
    secrets_in: Iterable[str],
) -> TokenResponse:
    what = f"token request ({data['grant_type']})"
    hidden = tuple(secrets_in)
    form, headers = _authenticate(client, auth_server, data)
    status, answer = await _call(
        fetcher.post_form(auth_server.token_endpoint, form, headers=headers), what, hidden
    )
    if not 200 <= status < 300:
        raise _error(status, answer, what, hidden, client)
    if answer is None:
        raise OAuthError("invalid_response", f"the answer to the {what} is not a JSON object", status)
    return parse_token_response(answer, status)


def parse_token_response(answer: Mapping[str, Any], status: int = 200) -> TokenResponse:
    """Validate a successful token response (RFC 6749 §5.1)."""
    access_token = answer.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise OAuthError("invalid_response", "the token response has no access_token", status)
    _check_token_chars("access_token", access_token, status)
    token_type = answer.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = token_type[:32] if isinstance(token_type, str) else token_type
        raise OAuthError(
            "invalid_response", f"the token response's token_type is {shown!r}, not Bearer", status
        )
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, str) and _SECONDS.fullmatch(expires_in.strip()):
        expires_in = int(expires_in)
    elif isinstance(expires_in, float) and expires_in == expires_in and abs(expires_in) < 1e12:
        expires_in = int(expires_in)
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or not 0 <= expires_in < 10**12:
        expires_in = None
    refresh_token = answer.get("refresh_token")
    refresh_token = refresh_token if isinstance(refresh_token, str) and refresh_token else None
    if refresh_token is not None:
        _check_token_chars("refresh_token", refresh_token, status)
    scope = answer.get("scope")
    return TokenResponse(
        access_token=access_token,
        token_type="Bearer",
        expires_in=expires_in,
        refresh_token=refresh_token,
        scope=tuple(scope.split()) if isinstance(scope, str) else None,
        raw=dict(answer),
    )


def _check_token_chars(name: str, token: str, status: int) -> None:
    if not _TOKEN_CHARS.fullmatch(token):
        raise OAuthError(
            "invalid_response",
            f"the token response's {name} contains control or non-ASCII characters, which a token "
            "may not have (RFC 6749); the authorization server is at fault",
            status,
        )


def _authenticate(
    client: ClientRegistration, auth_server: AuthServer, data: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and headers that authenticate the client by its auth method."""
    form = dict(data)
    method = client.auth_method
    if method == "private_key_jwt" and client.assertion_key is not None:
        # The assertion names the client (RFC 7523 §3): no client_id beside it,
        # as the MCP client credentials extension shows.
        form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        form["client_assertion"] = client_assertion(client.client_id, client.assertion_key, auth_server)
        return form, {}
    if method == "client_secret_basic" and client.client_secret:
        # RFC 6749 §2.3.1: both are form-urlencoded before Basic encoding.
        credentials = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
        return form, {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode("ascii")}
    form["client_id"] = client.client_id
    if method == "client_secret_post" and client.client_secret:
        form["client_secret"] = client.client_secret
    return form, {}


async def _call(request: Any, what: str, hidden: Iterable[str]) -> tuple[int, dict[str, Any] | None]:
    """Await a fetcher POST, mapping its failures onto this module's errors."""
    try:
        result: tuple[int, dict[str, Any] | None] = await request
        return result
    except UnsafeURL as exc:
        raise OAuthError("unsafe_url", f"{what}: {_scrub(str(exc), hidden)}") from None
    except FetchError as exc:
        message = f"{what}: {_scrub(exc.message, hidden)}"
        if exc.transient:
            raise AuthServerUnavailable(message) from None
        raise OAuthError("invalid_response", message, exc.http_status) from None


def _error(
    status: int,
    answer: Mapping[str, Any] | None,
    what: str,
    hidden: Iterable[str],
    client: ClientRegistration | None = None,
) -> OAuthError:
    """The OAuthError for a non-success answer (RFC 6749 §5.2)."""
    hidden = (*hidden, *((client.client_secret,) if client and client.client_secret else ()))
    error = answer.get("error") if answer else None
    if isinstance(error, str) and _ERROR_CODE.fullmatch(error):
        description = answer.get("error_description") if answer else None
        text = _scrub(description, hidden)[:300] if isinstance(description, str) else None
        return OAuthError(error, text, status)
    return OAuthError("invalid_response", f"the {what} failed with HTTP {status} and no OAuth error", status)


def _scrub(text: str, hidden: Iterable[str]) -> str:
    """Mask secrets a server might echo back, and control characters."""
    for value in hidden:
        if value and len(value) >= 4:
            text = text.replace(value, "[redacted]")
    return "".join(c if c.isprintable() else " " for c in text)
