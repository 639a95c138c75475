"""Test peer: an OAuth-protected MCP server (official Python SDK, streamable HTTP).

It is an OAuth 2.1 resource server as the MCP authorization spec describes one, in front of
the SDK's streamable-HTTP app, and trusts one authorization server (``peers.oauth``'s
oidc-provider, or any issuer of RS256/PS256/ES256 JWT access tokens)::

    from peers.mcp_resource_server import run_resource_server

    with run_resource_server(auth.issuer) as rs:             # sync context manager
        rs.mcp_url       # http://127.0.0.1:<port>/mcp  -- also the resource (audience) it accepts
        rs.prm_url       # http://127.0.0.1:<port>/.well-known/oauth-protected-resource/mcp
        rs.stats()       # GET /_stats  (rs.astats() in async code), rs.reset_stats()

or ``python tests/peers/mcp_resource_server.py --issuer URL [--port 0] ...`` (see ``--help``);
it prints ``READY <port>`` once listening.

Protected resource metadata (RFC 9728) at ``/.well-known/oauth-protected-resource/mcp``
(path-aware; ``--prm-location root|both|none`` serves it at the root form instead, at both, or
nowhere): ``resource`` = ``http://127.0.0.1:<port>/mcp``, ``authorization_servers`` = [issuer]
(``--authorization-server`` overrides), ``scopes_supported`` (default ``mcp:tools admin``),
``bearer_methods_supported: ["header"]``.

Every request to ``/mcp`` needs ``Authorization: Bearer <JWT>``, checked against the issuer's
JWKS (found through its metadata, refetched on an unknown ``kid``): signature, ``exp`` (no
leeway), ``iss`` == issuer, ``aud`` contains the resource URL. Answers:

* no token: 401 ``WWW-Authenticate: Bearer resource_metadata="<prm url>", scope="mcp:tools"``;
* a bad token (expired, wrong audience or issuer, bad signature, opaque): 401 with
  ``error="invalid_token"`` and ``error_description`` naming the reason, plus the same parameters;
* a token without the required scope (``--required-scope``, default ``mcp:tools``): 403
  ``error="insufficient_scope"``;
* ``tools/call`` of ``admin_action`` with a token without ``admin``: 403
  ``Bearer error="insufficient_scope", scope="mcp:tools admin", resource_metadata="..."``
  (the HTTP request is refused before the SDK sees it, as step-up expects).

``--no-challenge-metadata`` leaves ``resource_metadata`` out of challenges (clients must then
try the well-known URLs); ``--challenge-metadata-url URL`` puts another URL there.

MCP tools: ``whoami()`` returns JSON ``{sub, scopes, aud, client_id, iss, exp}`` of the token of
the request carrying the call; ``echo(text)``; ``admin_action()`` returns ``"admin ok"``.

``GET /_stats``: ``unauthorized`` (401s), ``forbidden`` (403s), ``accepted`` (requests let through
with a valid token), ``rejections`` (reason -> count: ``missing``, ``malformed``, ``expired``,
``wrong_audience``, ``wrong_issuer``, ``bad_signature``, ``unknown_key``, ``insufficient_scope``,
...), ``accepted_by_sub``, ``distinct_tokens`` (accepted distinct access tokens), ``tool_calls``
(name -> count), ``prm_requests`` (path -> count), ``jwks_fetches``, ``last_claims``.
``POST /_stats/reset`` zeroes them. These routes need no token.

The SDK's own checks still apply: Host/Origin (``--no-host-check`` lifts them, as in
``mcp_upstream.py``) and the binding of a session to the principal (client_id, iss, sub) that
created it, which a refreshed token of the same grant keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import jwt
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from starlette.authentication import AuthCredentials

SCRIPT = Path(__file__).resolve()
MCP_PATH = "/mcp"
PRM_WELL_KNOWN = "/.well-known/oauth-protected-resource"
DEFAULT_SCOPES = ("mcp:tools", "admin")
ADMIN_TOOL, ADMIN_SCOPE = "admin_action", "admin"


# =========================================================================== test-side helper


@dataclass
class ResourceServer:
    """A running ``mcp_resource_server.py`` subprocess."""

    port: int
    proc: subprocess.Popen[str]
    prm_location: str = "path"
    output: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return self.base_url + MCP_PATH

    @property
    def resource(self) -> str:
        """The canonical resource URL: what tokens must carry as ``aud``."""
        return self.mcp_url

    @property
    def prm_url(self) -> str:
        suffix = "" if self.prm_location == "root" else MCP_PATH
        return self.base_url + PRM_WELL_KNOWN + suffix

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + "/_stats", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    async def astats(self) -> dict[str, Any]:
        async with httpx2.AsyncClient(timeout=5) as client:
            data: dict[str, Any] = (await client.get(self.base_url + "/_stats")).json()
            return data

    def reset_stats(self) -> None:
        req = urllib.request.Request(self.base_url + "/_stats/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=5).close()

    def deny_seen_tokens(self) -> int:
        """Refuse (401 invalid_token) every token accepted so far; later ones pass."""
        req = urllib.request.Request(self.base_url + "/_deny", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(json.loads(resp.read())["denied"])


@contextlib.contextmanager
def run_resource_server(
    issuer: str,
    *,
    port: int = 0,
    json_response: bool = False,
    stateless: bool = False,
    required_scope: str = "mcp:tools",
    scopes_supported: Sequence[str] = DEFAULT_SCOPES,
    prm_location: str = "path",
    challenge_metadata: bool = True,
    challenge_metadata_url: str | None = None,
    authorization_servers: Sequence[str] = (),
    jwks_uri: str | None = None,
    no_host_check: bool = False,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 20.0,
) -> Iterator[ResourceServer]:
    """Start the resource server trusting ``issuer``; wait for ``READY <port>``; stop on exit."""
    from peers import process  # here: this file also runs as the server script itself

    cmd = [sys.executable, str(SCRIPT), "--issuer", issuer, "--port", str(port), "--exit-on-stdin-eof"]
    cmd += ["--required-scope", required_scope, "--scopes-supported", " ".join(scopes_supported)]
    cmd += ["--prm-location", prm_location]
    if json_response:
        cmd.append("--json-response")
    if stateless:
        cmd.append("--stateless")
    if not challenge_metadata:
        cmd.append("--no-challenge-metadata")
    if challenge_metadata_url:
        cmd += ["--challenge-metadata-url", challenge_metadata_url]
    for url in authorization_servers:
        cmd += ["--authorization-server", url]
    if jwks_uri:
        cmd += ["--jwks-uri", jwks_uri]
    if no_host_check:
        cmd.append("--no-host-check")
    cmd += list(extra_args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        server = ResourceServer(int(process.wait_ready(proc, startup_timeout)[0]), proc, prm_location)
        process.drain(proc, server.output)
        yield server
    finally:
        process.stop(proc)


class TokenError(Exception):
    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


@dataclass
class Stats:
    unauthorized: int = 0
    forbidden: int = 0
    accepted: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    accepted_by_sub: Counter[str] = field(default_factory=Counter)
    tokens: set[str] = field(default_factory=set)
    tool_calls: Counter[str] = field(default_factory=Counter)
    prm_requests: Counter[str] = field(default_factory=Counter)
    jwks_fetches: int = 0
    last_claims: dict[str, Any] | None = None

    def reset(self) -> None:
        fresh = Stats()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def snapshot(self) -> dict[str, Any]:
        return {
            "unauthorized": self.unauthorized,
            "forbidden": self.forbidden,
            "accepted": self.accepted,
            "rejections": dict(self.rejections),
            "accepted_by_sub": dict(self.accepted_by_sub),
            "distinct_tokens": len(self.tokens),
            "tool_calls": dict(self.tool_calls),
            "prm_requests": dict(self.prm_requests),
            "jwks_fetches": self.jwks_fetches,
            "last_claims": self.last_claims,
        }


STATS = Stats()
DENIED: set[str] = set()


class JwtVerifier:
    """Verifies JWT access tokens against the issuer's JWKS (PyJWT)."""

    ALGORITHMS = ["RS256", "PS256", "ES256"]

    def __init__(self, issuer: str, audience: str, jwks_uri: str | None = None) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks_uri = jwks_uri
        self._keys: dict[str, Any] = {}
        self._last_fetch = 0.0
        self._lock = asyncio.Lock()

    async def _discover_jwks_uri(self) -> str:
        parts = urlsplit(self.issuer)
        origin, path = f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")
        candidates = [
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}/.well-known/openid-configuration{path}",
            f"{origin}{path}/.well-known/openid-configuration",
        ]
        async with httpx2.AsyncClient(timeout=5) as client:
            for url in candidates:
                r = await client.get(url)
                if r.status_code == 200 and r.json().get("issuer") == self.issuer:
                    return str(r.json()["jwks_uri"])
        raise TokenError("no_jwks", f"no metadata with a jwks_uri for issuer {self.issuer}")

    async def _refresh_keys(self) -> None:
        async with self._lock:
            if time.monotonic() - self._last_fetch < 1.0:
                return  # fetched just now by a concurrent request
            if self.jwks_uri is None:
                self.jwks_uri = await self._discover_jwks_uri()
            async with httpx2.AsyncClient(timeout=5) as client:
                r = await client.get(self.jwks_uri)
                r.raise_for_status()
            STATS.jwks_fetches += 1
            keyset = jwt.PyJWKSet.from_dict(r.json())
            self._keys = {k.key_id: k for k in keyset.keys if k.key_id}
            self._last_fetch = time.monotonic()

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed", f"not a JWT: {exc}") from None
        kid = header.get("kid")
        if kid not in self._keys:
            await self._refresh_keys()
        key = self._keys.get(kid)
        if key is None:
            raise TokenError("unknown_key", f"no key {kid!r} in the issuer's JWKS")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=self.ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("expired", "the access token has expired") from None
        except jwt.InvalidAudienceError:
            raise TokenError("wrong_audience", f"the access token is not for {self.audience}") from None
        except jwt.InvalidIssuerError:
            raise TokenError("wrong_issuer", f"the access token is not from {self.issuer}") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "bad signature") from None
        except jwt.PyJWTError as exc:
            raise TokenError("invalid", str(exc)) from None
        return claims


def _scopes(claims: dict[str, Any]) -> list[str]:
    scope = claims.get("scope", "")
    return scope.split() if isinstance(scope, str) else list(scope)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            v = value.decode("latin-1")
            if v[:7].lower() == "bearer ":
                return v[7:].strip()
            return ""
    return None


async def _send_json(
    send: Any, status: int, payload: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ProtectedResource:
    """ASGI wrapper: PRM, bearer checks, step-up 403, side routes; the SDK app behind it."""

    def __init__(self, app: Any, args: argparse.Namespace, resource: str, verifier: JwtVerifier) -> None:
        self.app = app
        self.args = args
        self.resource = resource
        self.verifier = verifier
        base = resource.removesuffix(MCP_PATH)
        self.prm_paths = {
            "path": [PRM_WELL_KNOWN + MCP_PATH],
            "root": [PRM_WELL_KNOWN],
            "both": [PRM_WELL_KNOWN + MCP_PATH, PRM_WELL_KNOWN],
            "none": [],
        }[args.prm_location]
        if args.challenge_metadata_url:
            self.challenge_metadata: str | None = args.challenge_metadata_url
        elif args.no_challenge_metadata or not self.prm_paths:
            self.challenge_metadata = None
        else:
            self.challenge_metadata = base + self.prm_paths[0]
        self.prm = {
            "resource": resource,
            "authorization_servers": args.authorization_server or [args.issuer],
            "scopes_supported": args.scopes_supported.split(),
            "bearer_methods_supported": ["header"],
            "resource_name": "Keybearer test resource server",
        }

    def _challenge(self, error: str | None, description: str | None, scope: str) -> bytes:
        parts = []
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append('error_description="{}"'.format(description.replace('"', "'").replace("\\", "/")))
        if self.challenge_metadata:
            parts.append(f'resource_metadata="{self.challenge_metadata}"')
        parts.append(f'scope="{scope}"')
        return ("Bearer " + ", ".join(parts)).encode()

    async def _deny(
        self, send: Any, status: int, reason: str, error: str | None, description: str, scope: str
    ) -> None:
        if status == 401:
            STATS.unauthorized += 1
        else:
            STATS.forbidden += 1
        STATS.rejections[reason] += 1
        header = (b"www-authenticate", self._challenge(error, description if error else None, scope))
        await _send_json(
            send, status, {"error": error or "unauthorized", "error_description": description}, [header]
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/_stats":
            await _send_json(send, 200, STATS.snapshot())
            return
        if path == "/_stats/reset" and scope["method"] == "POST":
            STATS.reset()
            await _send_json(send, 200, STATS.snapshot())
            return
        if path == "/_deny" and scope["method"] == "POST":
            # Revoke, at this resource server, every token it has seen so far:
            # what a provider-side revocation looks like to an API that checks
            # tokens online. Tokens issued later are accepted again.
            DENIED.update(STATS.tokens)
            await _send_json(send, 200, {"denied": len(DENIED)})
            return
        if path.startswith(PRM_WELL_KNOWN):
            STATS.prm_requests[path] += 1
            if path in self.prm_paths and scope["method"] in ("GET", "HEAD"):
                await _send_json(send, 200, self.prm, [(b"access-control-allow-origin", b"*")])
            else:
                await _send_json(send, 404, {"error": "not_found"})
            return
        if path.rstrip("/") != MCP_PATH:
            await self.app(scope, receive, send)
            return

        required = self.args.required_scope
        token = _bearer(scope["headers"])
        if not token:
            reason = "missing" if token is None else "malformed"
            await self._deny(
                send, 401, reason, None if token is None else "invalid_request", "no bearer token", required
            )
            return
        try:
            if token in DENIED:
                raise TokenError("revoked", "this token was revoked")
            claims = await self.verifier.verify(token)
        except TokenError as exc:
            await self._deny(send, 401, exc.reason, "invalid_token", exc.description, required)
            return
        granted = _scopes(claims)
        if required and required not in granted:
            await self._deny(
                send, 403, "insufficient_scope", "insufficient_scope", f"needs scope {required}", required
            )
            return

        # Buffer a POST body to see which tool it calls (JSON-RPC bodies are small).
        if scope["method"] == "POST":
            body = b""
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            tools = _called_tools(body)
            if ADMIN_TOOL in tools and ADMIN_SCOPE not in granted:
                needed = " ".join(s for s in dict.fromkeys([required, *granted, ADMIN_SCOPE]) if s)
                await self._deny(
                    send,
                    403,
                    "insufficient_scope",
                    "insufficient_scope",
                    f"{ADMIN_TOOL} needs scope {ADMIN_SCOPE}",
                    needed,
                )
                return
            for name in tools:
                STATS.tool_calls[name] += 1
            receive = _replay(body, receive)

        STATS.accepted += 1
        STATS.accepted_by_sub[str(claims.get("sub"))] += 1
        STATS.tokens.add(token)
        STATS.last_claims = claims
        aud = claims.get("aud")
        access = AccessToken(
            token=token,
            client_id=str(claims.get("client_id", "")),
            scopes=granted,
            expires_at=int(claims["exp"]),
            resource=aud if isinstance(aud, str) else self.resource,
            subject=str(claims["sub"]),
            claims=claims,
        )
        scope = {**scope, "user": AuthenticatedUser(access), "auth": AuthCredentials(granted)}
        await self.app(scope, receive, send)


def _called_tools(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except ValueError:
        return []
    messages = data if isinstance(data, list) else [data]
    return [
        str(m["params"].get("name"))
        for m in messages
        if isinstance(m, dict) and m.get("method") == "tools/call" and isinstance(m.get("params"), dict)
    ]


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def build_mcp_server() -> Any:
    server = MCPServer("keybearer-test-resource-server")

    @server.tool()
    def whoami(ctx: Context) -> str:
        """The access token of this request: sub, scopes, aud, client_id, iss, exp."""
        auth = (ctx.headers or {}).get("authorization", "")
        claims = jwt.decode(auth[7:], options={"verify_signature": False}) if auth else {}
        return json.dumps(
            {
                "sub": claims.get("sub"),
                "scopes": _scopes(claims),
                "aud": claims.get("aud"),
                "client_id": claims.get("client_id"),
                "iss": claims.get("iss"),
                "exp": claims.get("exp"),
            }
        )

    @server.tool()
    def echo(text: str) -> str:
        """Return ``text`` unchanged."""
        return text

    @server.tool()
    def admin_action() -> str:
        """Needs the ``admin`` scope (enforced in front of the SDK with a 403 step-up challenge)."""
        return "admin ok"

    return server


async def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    resource = f"http://{args.host}:{port}{MCP_PATH}"

    security = (
        TransportSecuritySettings(enable_dns_rebinding_protection=False) if args.no_host_check else None
    )
    mcp_app = build_mcp_server().streamable_http_app(
        streamable_http_path=MCP_PATH,
        json_response=args.json_response,
        stateless_http=args.stateless,
        session_idle_timeout=None,
        transport_security=security,
        host=args.host,
    )
    # MCPServer() configured the root logger at INFO (to stderr); quieten it.
    logging.getLogger().setLevel(args.log_level.upper())
    app = ProtectedResource(mcp_app, args, resource, JwtVerifier(args.issuer, resource, args.jwks_uri))
    config = uvicorn.Config(app, lifespan="on", log_level=args.log_level, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise SystemExit("uvicorn exited during startup")
        await asyncio.sleep(0.01)
    print(f"READY {port}", flush=True)
    if args.exit_on_stdin_eof:
        loop = asyncio.get_running_loop()

        def watch_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(setattr, server, "should_exit", True)

        threading.Thread(target=watch_stdin, daemon=True).start()
    await task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--issuer", required=True, help="the trusted authorization server's issuer")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (on the READY line)")
    p.add_argument("--required-scope", default="mcp:tools", help="needed for any /mcp request ('' = none)")
    p.add_argument("--scopes-supported", default=" ".join(DEFAULT_SCOPES))
    p.add_argument("--prm-location", choices=["path", "root", "both", "none"], default="path")
    p.add_argument("--no-challenge-metadata", action="store_true", help="no resource_metadata in challenges")
    p.add_argument("--challenge-metadata-url", help="resource_metadata value to send instead of our own")
    p.add_argument("--authorization-server", action="append", default=[], help="listed in the PRM instead")
    p.add_argument("--jwks-uri", help="skip discovery of the issuer's jwks_uri")
    p.add_argument("--json-response", action="store_true")
    p.add_argument("--stateless", action="store_true")
    p.add_argument("--no-host-check", action="store_true")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(serve(parse_args()))
