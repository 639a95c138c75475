"""Test peer: a real OAuth 2.1 authorization server (npm ``oidc-provider`` 9.x) on loopback.

The server is ``server.mjs`` beside this file; its npm dependencies are pinned by
``package.json`` + ``package-lock.json`` and installed on first use by ``ensure_installed()``
(``npm ci``, skipped while ``node_modules`` matches the lock file). Node and npm come from
``tests/system-deps.sh`` (Debian's ``nodejs``/``npm``; oidc-provider warns that it wants Node 22
and works on Debian's Node 20)::

    from peers.oauth import run_authorization_server, STATIC_CONFIDENTIAL

    with run_authorization_server(access_token_ttl=5, redirect_uris=[cb]) as auth:   # sync CM
        auth.issuer        # http://127.0.0.1:<port>   (+ issuer_path, e.g. /tenant)
        auth.metadata()    # the RFC 8414 document
        auth.stats()       # GET /_stats  (auth.astats() in async code)

The process prints ``READY <port> <issuer>`` once listening (``port=0``, the default, lets the OS
choose: no race) and then one JSON object per line for provider events (kept in ``auth.output``;
``auth.events()`` returns them parsed, from ``GET /_events``, so without a race against the pipe).
It exits when the test process goes away (stdin EOF).

Configuration (keyword arguments of ``run_authorization_server``, passed as JSON to server.mjs):

``issuer_path``        ``""`` or e.g. ``"/tenant"``: issuer ``http://127.0.0.1:<port>/tenant``,
                       every endpoint under that path.
``discovery``          which well-known URLs answer (others 404), default all three:
                       ``"oauth"``  ``/.well-known/oauth-authorization-server{path}`` (RFC 8414),
                       ``"openid"`` ``/.well-known/openid-configuration{path}`` (path inserted),
                       ``"openid-appended"`` ``{path}/.well-known/openid-configuration``.
``access_token_ttl``   seconds (default 3600), ``refresh_token_ttl`` (default 14 days).
``resource_scopes``    scopes any resource may be granted (default ``["mcp:tools", "admin"]``);
                       also listed in ``scopes_supported``.
``default_scope``      added to an authorization request that has no ``scope`` (default
                       ``"mcp:tools"``; ``""`` = never, then such a request ends in
                       ``access_denied`` after login, as oidc-provider does).
``default_resource``   resource used when the authorization request names none (default none).
``require_resource``   default False: a token request without ``resource`` gets a token for the
                       grant's only resource (oidc-provider's behaviour); True answers such a code
                       or refresh request ``400 invalid_target`` instead. Either way
                       ``stats()["token_log"]`` shows the ``resource`` each token request sent.
``allowed_resource_hosts``  hosts a ``resource`` may name (default loopback); else ``invalid_target``.
``redirect_uris``      of the two built-in static clients (below).
``clients``            list of client metadata replacing the built-in static clients.
``cimd``               Client ID Metadata Document (experimental in oidc-provider, draft-02):
                       ``True`` enables it as oidc-provider has it (https client ids only, loopback
                       addresses refused); ``{"allow_http_loopback": True}`` additionally fetches an
                       ``https://127.0.0.1:<port>/...`` client id over plain http (tests have no TLS).
``refresh_tokens``     ``"always"`` (default): a refresh token for every client registered with the
                       ``refresh_token`` grant; ``"offline_access"``: only when ``offline_access`` was
                       granted too (oidc-provider's own default, as at Okta, Auth0, Entra ID);
                       ``"never"``: no refresh tokens at all.
``faults``             list of injected faults, e.g. ``[{"route": "token", "grant_type":
                       "refresh_token", "status": 503, "count": 1}]`` or ``{"route": "token",
                       "delay": 10}`` (delay only: the real answer comes late). ``count`` defaults
                       to 1, ``-1`` = forever. ``"route": "discovery"`` applies to the
                       authorization server's well-known metadata documents.
``log_success``        also print ``grant.success`` / ``authorization.success`` events.
``account_claims``     ``{sub: {claim: value}}``: more claims of an account (``name``, ``groups``, ...);
                       every account has ``email`` ``<sub>@example.com``. As an OpenID provider, the
                       scopes ``profile``, ``email`` and ``groups`` put their claims into the ID token.

Behaviour (oidc-provider features): the client credentials grant for clients registered with it
(``grant_types: ["client_credentials"]``; JWT access tokens for the ``resource``, lifetime
``access_token_ttl``), ``private_key_jwt`` client authentication for clients registered with a
``jwks`` (assertion ``aud``: the issuer or the token endpoint), open Dynamic Client Registration
(``/reg``), PKCE required (S256 only), RFC 8707 resource indicators (access tokens are RS256 JWTs, ``typ: at+jwt``,
``aud`` = the resource, ``scope`` = granted resource scopes, ``client_id``, ``sub``), refresh tokens
as ``refresh_tokens`` says (by default for every client registered with the ``refresh_token``
grant, no ``offline_access`` needed), refresh token rotation on every use; replaying a used refresh token (or code) revokes the whole grant
(counted in ``refresh_reuse_detected``; the new refresh token stops working too), revocation
(``/token/revocation``: revoking a refresh token revokes its grant), introspection, RFC 9207
``iss`` in every authorization response, devInteractions login (any login + any password; the
login becomes ``sub``) and consent pages (see ``peers.browser.complete_login_and_consent``).

Built-in static clients (grant types authorization_code + refresh_token, ``redirect_uris`` from the
config): ``STATIC_CONFIDENTIAL`` (``client_secret_basic``) and ``STATIC_PUBLIC`` (``none``).
``auth.add_client(metadata)`` stores another one at run time (e.g. with the proxy's callback URL).

Test-only routes (at the root of the origin whatever the issuer path), wrapped as methods:
``stats()`` / ``GET /_stats``: ``token_requests`` (grant type -> count, every POST to the token
endpoint whatever its outcome), ``token_errors`` (``"<grant>:<error>"`` -> count),
``refresh_reuse_detected``, ``code_reuse_detected``, ``grants_revoked``, ``authorization_requests``,
``authorizations_issued``, ``registrations``, ``revocation_requests``, ``introspection_requests``,
``discovery_requests`` (path -> count), ``jwks_requests``, ``cimd_fetches``, ``faults_applied``,
``token_log`` (per token request: grant_type, client_id, client_auth (``client_secret_basic``,
``client_secret_post``, ``private_key_jwt`` or ``none``, as sent), resource, scope,
has_code_verifier, redirect_uri, status, error) and ``authorization_log`` (query of each authorization request).
``reset_stats()``; ``settings(**kw)`` changes ``access_token_ttl``, ``refresh_token_ttl``,
``default_scope``, ``faults``, ``resource_scopes``, ``require_resource``, ``log_success`` at run
time; ``revoke(sub,
client_id=None)`` (``POST /_revoke?sub=``) revokes every grant of that account with all its
tokens, as a user revoking access at the provider would (JWT access tokens stay valid at the
resource server until they expire: it checks them offline). The standard way works too:
``POST /token/revocation`` with the client's credentials and ``token=<refresh token>``.

OAuth client helpers for tests that play the client themselves: ``pkce_pair()``,
``authorization_url(...)``, ``token_request(...)``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from peers import npm, process

OAUTH_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = OAUTH_DIR / "server.mjs"

STATIC_CONFIDENTIAL = {"client_id": "static-confidential", "client_secret": "static-confidential-secret"}
STATIC_PUBLIC = {"client_id": "static-public"}


# --------------------------------------------------------------------------- install


def ensure_installed() -> None:
    """``npm ci`` here unless node_modules already matches the lock file (peers/npm.py)."""
    npm.ensure_installed(OAUTH_DIR)


# --------------------------------------------------------------------------- process


@dataclass
class AuthorizationServer:
    """A running ``server.mjs``."""

    port: int
    issuer: str
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)  # stdout lines after READY

    @property
    def base_url(self) -> str:
        """The origin (test-only routes live here, whatever the issuer path)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer_path(self) -> str:
        return self.issuer.removeprefix(self.base_url)

    @property
    def metadata_url(self) -> str:
        """RFC 8414 path-aware URL of the metadata."""
        return f"{self.base_url}/.well-known/oauth-authorization-server{self.issuer_path}"

    def endpoint(self, name: str) -> str:
        """``authorization``, ``token``, ``registration``, ``revocation``, ``introspection``, ``jwks``."""
        paths = {
            "authorization": "/auth",
            "token": "/token",
            "registration": "/reg",
            "revocation": "/token/revocation",
            "introspection": "/token/introspection",
            "jwks": "/jwks",
        }
        return self.issuer + paths[name]

    def metadata(self) -> dict[str, Any]:
        return self._get(self.metadata_url.removeprefix(self.base_url))

    def stats(self) -> dict[str, Any]:
        return self._get("/_stats")

    async def astats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(self.base_url + "/_stats")
            r.raise_for_status()
            stats: dict[str, Any] = r.json()
            return stats

    def reset_stats(self) -> None:
        self._post("/_stats/reset")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The provider's event lines so far (``GET /_events``), optionally only those named ``name``
        (``grant.error``, ``grant.revoked``, ``refresh_reuse_detected``, ``server_error``, ...)."""
        events: list[dict[str, Any]] = self._get("/_events")
        return [e for e in events if name is None or e.get("event") == name]

    def settings(self, **kw: Any) -> dict[str, Any]:
        """Change mutable settings (access_token_ttl, refresh_token_ttl, default_scope, faults, ...)."""
        return self._post("/_settings", kw)

    def add_client(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Store a client (upsert by client_id), validated as oidc-provider validates registrations."""
        return self._post("/_clients", dict(metadata))

    def revoke(self, sub: str, client_id: str | None = None) -> int:
        """Revoke every grant of ``sub`` (optionally only for ``client_id``); returns how many."""
        query = urlencode({"sub": sub, **({"client_id": client_id} if client_id else {})})
        return int(self._post(f"/_revoke?{query}")["revoked_grants"])

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=5) as resp:
            return json.loads(resp.read())

    def _post(self, path: str, payload: Any = None) -> dict[str, Any]:
        r = httpx.post(self.base_url + path, json=payload if payload is not None else {}, timeout=5)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text}")
        data: dict[str, Any] = r.json()
        return data


@contextlib.contextmanager
def run_authorization_server(
    *, startup_timeout: float = 30.0, **config: Any
) -> Iterator[AuthorizationServer]:
    """Start ``server.mjs`` (installing its npm packages first if needed) with ``config`` (see the
    module doc), wait for ``READY <port> <issuer>``, stop it on exit (SIGTERM, SIGKILL after 5 s).

    stderr is inherited (oidc-provider's start-up warnings; pytest shows them on failure).
    """
    ensure_installed()
    cmd = ["node", str(SERVER_SCRIPT), "--config", json.dumps(config), "--exit-on-stdin-eof"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=OAUTH_DIR)
    try:
        try:
            ready = process.wait_ready(proc, startup_timeout)
        except TimeoutError:
            # Seen once in a fresh-clone run on a loaded machine: node printed nothing
            # for 30 s. One restart, so a stuck start does not fail the suite; a
            # server that never starts still fails here.
            process.stop(proc)
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=OAUTH_DIR
            )
            ready = process.wait_ready(proc, startup_timeout)
        server = AuthorizationServer(int(ready[0]), ready[1] if len(ready) > 1 else "", proc)
        process.drain(proc, server.output)
        yield server
    finally:
        process.stop(proc)


# --------------------------------------------------------------------------- OAuth client helpers


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization_url(
    auth: AuthorizationServer,
    *,
    client_id: str,
    redirect_uri: str,
    code_challenge: str,
    state: str,
    resource: str | None = None,
    scope: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
        "state": state,
        **({"resource": resource} if resource else {}),
        **({"scope": scope} if scope else {}),
        **(extra or {}),
    }
    return f"{auth.endpoint('authorization')}?{urlencode(params)}"


def token_request(
    auth: AuthorizationServer,
    data: Mapping[str, str],
    *,
    client_id: str,
    client_secret: str | None = None,
) -> httpx.Response:
    """POST to the token endpoint: client_secret_basic when a secret is given, else client_id in
    the body (public client)."""
    body = dict(data)
    auth_header = None
    if client_secret is None:
        body["client_id"] = client_id
    else:
        auth_header = httpx.BasicAuth(client_id, client_secret)
    return httpx.post(auth.endpoint("token"), data=body, auth=auth_header, timeout=10)


def register_client(auth: AuthorizationServer, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Dynamic Client Registration (RFC 7591); returns the registration response (201)."""
    r = httpx.post(auth.endpoint("registration"), json=dict(metadata), timeout=10)
    if r.status_code != 201:
        raise RuntimeError(f"registration failed: {r.status_code} {r.text}")
    data: dict[str, Any] = r.json()
    return data


__all__ = [
    "OAUTH_DIR",
    "STATIC_CONFIDENTIAL",
    "STATIC_PUBLIC",
    "AuthorizationServer",
    "authorization_url",
    "ensure_installed",
    "pkce_pair",
    "register_client",
    "run_authorization_server",
    "token_request",
]
