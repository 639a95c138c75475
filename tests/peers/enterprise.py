"""Test peer: an organisation's identity provider and the authorization servers
that trust it, for the Identity Assertion JWT Authorization Grant (ID-JAG).

One in-process loopback HTTP server (a thread), for in-process tests::

    with run_enterprise() as org:
        org.idp_issuer                  # http://127.0.0.1:<port>/idp (OpenID provider)
        org.add_client(id, secret)      # a client of the provider (Keybearer's sign-in)
        org.sign_in_as = "alice"        # whoever opens /idp/authorize is signed in as alice
        issuer = org.add_auth_server("one", resource, client_id, secret)  # .../as/one
        org.allow("alice", issuer)      # the policy table: who may have which audience
        org.exchanges[("alice", issuer)], org.grants[("alice", issuer)]
        org.id_token_ttl = 3            # seconds the ID tokens it issues from now on live
        org.renewals["alice"]           # refresh_token grants it answered with a new ID token
        org.revoke("alice")             # her sessions and refresh tokens at the provider end

The provider: discovery, JWKS, an authorization endpoint that signs in
`sign_in_as` at once (PKCE S256, nonce, RFC 9207 iss), or, when it is empty,
shows a sign-in page where a person types their user id (a browser's journey),
and a token endpoint (client_secret_basic) for the code, for the refresh token
(issued when `offline_access` was asked for; rotated on every use, a reused or
revoked one is `invalid_grant`; the answer carries a new ID token), and for
RFC 8693 token exchange of its own
ID tokens (audience = its client) into ID-JAGs (`typ` oauth-id-jag+jwt, `aud`
the authorization server, `client_id` the one registered there for the
audience, `resource`, `scope`, `jti`, five minutes), answering `access_denied`
when the policy table does not allow (user, audience).

Each authorization server: RFC 8414 metadata (path-aware), JWKS, and a token
endpoint (client_secret_basic) for the RFC 7523 JWT bearer grant that checks
the ID-JAG as the extension says (signature by the provider's key, `typ`,
`iss`, `aud`, `client_id` = the authenticated client, `resource`, `exp`, `jti`
never seen before) and issues RS256 JWT access tokens for the resource that
live `token_ttl` seconds. `client_id` is the client the provider names in
ID-JAGs for it; `also` authenticates more clients (as when the operator moves
Keybearer to a new one). `refuse` makes it answer `unauthorized_client`;
`exchange_error` makes the provider answer every token exchange with that error.
`offline_mode` says when a sign-in gets a refresh token: "plain" (default) for
`offline_access`, as at Okta, Entra ID and Keycloak; "consent" only with
`prompt=consent` too, as OpenID Connect Core §11 allows (oidc-provider); "never".
`authorize_log` keeps each authorization request's scope and prompt.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JAG_TYP = "oauth-id-jag+jwt"


@dataclass
class AuthServer:
    issuer: str
    resource: str
    client_id: str
    secret: str
    key: RSAKey
    token_ttl: int
    refuse: bool = False
    seen_jti: set[str] = field(default_factory=set)
    also: dict[str, str] = field(default_factory=dict)  # more clients it authenticates (a client change)


class Enterprise:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.idp_issuer = f"{self.origin}/idp"
        self.idp_key = RSAKey.generate_key(2048, parameters={"kid": "idp-1"})
        self.clients: dict[str, str] = {}
        self.sign_in_as = ""
        self.codes: dict[str, dict[str, str]] = {}
        self.policy: set[tuple[str, str]] = set()
        self.auth_servers: dict[str, AuthServer] = {}  # by path name
        self.exchanges: Counter[tuple[str, str]] = Counter()
        self.grants: Counter[tuple[str, str]] = Counter()
        self.refusals: list[str] = []  # why an authorization server refused an ID-JAG
        self.exchange_error: str | None = None  # answer every token exchange with this error
        self.id_token_ttl = 300
        self.offline_mode = "plain"
        self.authorize_log: list[tuple[str, str]] = []  # (scope, prompt) of each authorization request
        self.refresh_tokens: dict[str, tuple[str, str]] = {}  # token -> (user, client)
        self.renewals: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add_client(self, client_id: str, secret: str) -> None:
        self.clients[client_id] = secret

    def add_auth_server(
        self, name: str, resource: str, client_id: str, secret: str, token_ttl: int = 300
    ) -> str:
        key = RSAKey.generate_key(2048, parameters={"kid": f"as-{name}"})
        issuer = f"{self.origin}/as/{name}"
        self.auth_servers[name] = AuthServer(issuer, resource, client_id, secret, key, token_ttl)
        return issuer

    def allow(self, user: str, audience: str) -> None:
        self.policy.add((user, audience))

    def revoke(self, user: str) -> None:
        """The person's sessions at the provider end: their refresh tokens are refused."""
        with self.lock:
            for token in [t for t, (u, _) in self.refresh_tokens.items() if u == user]:
                del self.refresh_tokens[token]

    def id_token(self, user: str, client_id: str, ttl: int | None = None, **extra: Any) -> str:
        now = int(time.time())
        claims = {"iss": self.idp_issuer, "aud": client_id, "sub": user, "iat": now,
                  "exp": now + (self.id_token_ttl if ttl is None else ttl), **extra}  # fmt: skip
        return jwt.encode({"alg": "RS256", "kid": "idp-1"}, claims, self.idp_key)

    # -- the provider ------------------------------------------------------------------

    def idp_metadata(self) -> dict[str, Any]:
        i = self.idp_issuer
        return {
            "issuer": i, "authorization_endpoint": f"{i}/authorize", "token_endpoint": f"{i}/token",
            "jwks_uri": f"{i}/jwks", "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "authorization_response_iss_parameter_supported": True,
            "grant_types_supported": ["authorization_code", "refresh_token", TOKEN_EXCHANGE],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
        }  # fmt: skip

    def authorize(self, query: dict[str, str], user: str) -> str:
        scopes, prompt = query.get("scope", "").split(), query.get("prompt", "")
        self.authorize_log.append((" ".join(scopes), prompt))
        offline = "offline_access" in scopes and (
            self.offline_mode == "plain" or (self.offline_mode == "consent" and "consent" in prompt.split())
        )
        code = secrets.token_urlsafe(16)
        self.codes[code] = {**query, "user": user, "offline": "1" if offline else ""}
        answer = {"code": code, "state": query["state"], "iss": self.idp_issuer}
        return f"{query['redirect_uri']}?{urlencode(answer)}"

    def idp_token(self, client_id: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") == "authorization_code":
            pending = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "").encode()
            challenge = base64.urlsafe_b64encode(sha256(verifier).digest()).rstrip(b"=").decode()
            if pending is None or pending["client_id"] != client_id or pending["code_challenge"] != challenge:
                return 400, {"error": "invalid_grant"}
            answer = {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "id_token": self.id_token(pending["user"], client_id, nonce=pending["nonce"]),
            }
            if pending["offline"]:
                answer["refresh_token"] = self._new_refresh_token(pending["user"], client_id)
            return 200, answer
        if form.get("grant_type") == "refresh_token":
            with self.lock:
                held = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if held is None or held[1] != client_id:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "refresh token unknown or revoked",
                }
            user = held[0]
            with self.lock:
                self.renewals[user] += 1
            return 200, {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "id_token": self.id_token(user, client_id),
                "refresh_token": self._new_refresh_token(user, client_id),
            }
        if form.get("grant_type") != TOKEN_EXCHANGE or self.exchange_error:
            return 400, {"error": self.exchange_error or "unsupported_grant_type"}
        if form.get("requested_token_type") != ID_JAG or form.get("subject_token_type") != ID_TOKEN:
            return 400, {"error": "invalid_request"}
        try:
            subject = jwt.decode(form.get("subject_token", ""), self.idp_key).claims
        except (JoseError, ValueError):
            return 400, {"error": "invalid_grant", "error_description": "subject token not ours"}
        if subject.get("aud") != client_id or subject.get("exp", 0) <= time.time():
            return 400, {"error": "invalid_grant", "error_description": "subject token not for this client"}
        user, audience = subject["sub"], form.get("audience", "")
        target = next((a for a in self.auth_servers.values() if a.issuer == audience), None)
        with self.lock:
            self.exchanges[(user, audience)] += 1
        if target is None or (user, audience) not in self.policy:
            return 400, {"error": "access_denied", "error_description": "not allowed by policy"}
        now = int(time.time())
        claims = {"iss": self.idp_issuer, "sub": user, "aud": audience, "client_id": target.client_id,
                  "jti": secrets.token_urlsafe(12), "iat": now, "exp": now + 300,
                  "resource": form.get("resource"), "scope": form.get("scope", "")}  # fmt: skip
        header = {"alg": "RS256", "kid": "idp-1", "typ": JAG_TYP}
        jag = jwt.encode(header, claims, self.idp_key)
        return 200, {"access_token": jag, "issued_token_type": ID_JAG, "token_type": "N_A", "expires_in": 300}

    def _new_refresh_token(self, user: str, client_id: str) -> str:
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.refresh_tokens[token] = (user, client_id)
        return token

    # -- the authorization servers -----------------------------------------------------

    def as_metadata(self, auth: AuthServer) -> dict[str, Any]:
        i = auth.issuer
        return {
            "issuer": i, "authorization_endpoint": f"{i}/authorize", "token_endpoint": f"{i}/token",
            "jwks_uri": f"{i}/jwks", "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "grant_types_supported": ["authorization_code", JWT_BEARER],
        }  # fmt: skip

    def as_token(self, auth: AuthServer, client_id: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") != JWT_BEARER:
            return 400, {"error": "unsupported_grant_type"}
        if auth.refuse:
            return 400, {"error": "unauthorized_client", "error_description": "jwt-bearer not allowed"}
        why = self._jag_problem(auth, client_id, form.get("assertion", ""))
        if why:
            self.refusals.append(why)
            return 400, {"error": "invalid_grant", "error_description": why}
        jag = jwt.decode(form["assertion"], self.idp_key).claims
        with self.lock:
            self.grants[(jag["sub"], auth.issuer)] += 1
        now = int(time.time())
        claims = {"iss": auth.issuer, "aud": auth.resource, "sub": jag["sub"], "client_id": client_id,
                  "scope": jag["scope"], "iat": now, "exp": now + auth.token_ttl,
                  "jti": secrets.token_urlsafe(12)}  # fmt: skip
        token = jwt.encode({"alg": "RS256", "kid": auth.key.kid}, claims, auth.key)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": auth.token_ttl,
                     "scope": jag["scope"]}  # fmt: skip

    def _jag_problem(self, auth: AuthServer, client_id: str, assertion: str) -> str | None:
        try:
            token = jwt.decode(assertion, self.idp_key)
        except (JoseError, ValueError) as exc:
            return f"not signed by the provider: {exc}"
        claims = token.claims
        checks = {
            "typ": token.header.get("typ") == JAG_TYP,
            "iss": claims.get("iss") == self.idp_issuer,
            "aud": claims.get("aud") == auth.issuer,
            "client_id": claims.get("client_id") == client_id,
            "resource": claims.get("resource") == auth.resource,
            "exp": isinstance(claims.get("exp"), int) and claims["exp"] > time.time(),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            return f"wrong {', '.join(failed)}"
        with self.lock:
            if claims.get("jti") in auth.seen_jti:
                return "jti replayed"
            auth.seen_jti.add(claims["jti"])
        return None


def _basic(header: str | None, clients: dict[str, str]) -> str | None:
    """The client id a Basic header authenticates, or None."""
    if not header or not header.startswith("Basic "):
        return None
    client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
    client_id, secret = unquote(client_id), unquote(secret)
    return client_id if clients.get(client_id) == secret else None


def _handler(org: Enterprise) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            path = parts.path
            if path == "/idp/.well-known/openid-configuration":
                return self._json(org.idp_metadata())
            if path == "/idp/jwks":
                return self._json({"keys": [org.idp_key.as_dict(private=False)]})
            if path == "/idp/authorize":
                if not org.sign_in_as:
                    return self._sign_in_page(query)
                return self._redirect(org.authorize(query, org.sign_in_as))
            for name, auth in org.auth_servers.items():
                if path == f"/.well-known/oauth-authorization-server/as/{name}":
                    return self._json(org.as_metadata(auth))
                if path == f"/as/{name}/jwks":
                    return self._json({"keys": [auth.key.as_dict(private=False)]})
            self._json({"error": "not_found"}, 404)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
            form = {k: v[0] for k, v in parse_qs(body).items()}
            authorization = self.headers.get("authorization")
            if self.path == "/idp/login":
                return self._redirect(org.authorize(json.loads(form["request"]), form["user"]))
            if self.path == "/idp/token":
                client_id = _basic(authorization, org.clients)
                if client_id is None:
                    return self._json({"error": "invalid_client"}, 401)
                status, payload = org.idp_token(client_id, form)
                return self._json(payload, status)
            for name, auth in org.auth_servers.items():
                if self.path == f"/as/{name}/token":
                    client_id = _basic(authorization, {auth.client_id: auth.secret, **auth.also})
                    if client_id is None:
                        return self._json({"error": "invalid_client"}, 401)
                    status, payload = org.as_token(auth, client_id, form)
                    return self._json(payload, status)
            self._json({"error": "not_found"}, 404)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("location", location)
            self.send_header("content-length", "0")
            self.end_headers()

        def _sign_in_page(self, query: dict[str, str]) -> None:
            request = html.escape(json.dumps(query), quote=True)
            body = (
                "<!doctype html><title>Example Org sign-in</title><h1>Example Org</h1>"
                '<form method="post" action="/idp/login"><label>User <input name="user"></label>'
                f'<input type="hidden" name="request" value="{request}"><button>Sign in</button></form>'
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload: Any, status: int = 200) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("cache-control", "no-store")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def run_enterprise() -> Iterator[Enterprise]:
    org = Enterprise()
    thread = threading.Thread(target=org.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield org
    finally:
        org.server.shutdown()
        org.server.server_close()
