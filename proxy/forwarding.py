"""The forwarding path: `/<user>/<server>` in, the upstream's answer out.

A request passes these stages, each a small function below:

    parse route -> find server -> upstream URL -> resolve credential
    -> request headers -> request body -> upstream call -> relay response

Responses are never buffered: JSON bodies are relayed as they arrive, event
streams chunk by chunk. The agent's `Authorization` and cookies stop here;
the credential is added here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.types import Message, Receive, Scope, Send

from proxy import credentials, inbound, legacy_sse, links, logs, metrics, responses, routing, upstream
from proxy.inbound import InboundAuth
from proxy.jsonbody import parse_json
from proxy.oauth.connector import Connector
from proxy.oauth.discovery import parse_www_authenticate
from proxy.oauth.lifecycle import NeedsConsent, TemporarilyUnavailable
from proxy.registry import Registry
from proxy.settings import ServerConfig, Settings

log = structlog.get_logger("keybearer.request")

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)  # fmt: skip
# Never sent upstream: the agent's own credentials, what we set ourselves,
# and the body's framing, which the upstream client writes.
DROP_REQUEST = HOP_BY_HOP | {
    b"host", b"authorization", b"cookie", b"content-length", b"accept-encoding",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"expect",
}  # fmt: skip
# Never sent back: a challenge would start the agent's own OAuth discovery
# against the proxy; cookies would land on the proxy's origin.
DROP_RESPONSE = HOP_BY_HOP | {b"set-cookie", b"www-authenticate", b"server", b"date"}
# Bodies up to this size are read whole: sent with a Content-Length and
# available to name the JSON-RPC id in an error. Larger ones are streamed.
WHOLE_BODY_LIMIT = 256 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class BodyTooLarge(Exception):
    pass


@dataclass(slots=True)
class Exchange:
    """One request's facts, for the log line and the error answers."""

    scope: Scope
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    user: str | None = None
    server: str | None = None
    mcp_method: str | None = None
    status: int = 0
    body: bytes | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    outcome: str = "ok"


MAX_STEP_UPS = 3


class Forwarder:
    def __init__(self, settings: Settings, registry: Registry, oauth: Connector | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.keyring = registry.keyring
        self.oauth = oauth
        self.inbound = InboundAuth(settings, registry)
        self.pool = upstream.Pool(settings.upstream_connect_timeout)
        self.draining = False
        self._streams: set[asyncio.Task[Any]] = set()

    def stop(self) -> None:
        self.pool.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(scope, _request_id(scope))
        try:
            await self._handle(ex, receive, send)
        finally:
            label = ex.server if ex.server in self.registry.servers else "-"
            metrics.request_counter(label, ex.status).inc()
            logs.request(
                request_id=ex.request_id,
                user=ex.user,
                server=ex.server,
                method=scope["method"],
                mcp_method=ex.mcp_method,
                status=ex.status,
                outcome=ex.outcome,
                duration_ms=round((time.perf_counter() - ex.started) * 1000, 2),
                bytes_in=ex.bytes_in,
                bytes_out=ex.bytes_out,
            )

    async def _handle(self, ex: Exchange, receive: Receive, send: Send) -> None:
        scope = ex.scope
        try:
            # Read first, so that every error below can answer a JSON-RPC
            # request with its own id.
            body = await read_body(scope, receive, self.settings.max_body_bytes, ex)
        except BodyTooLarge:
            return await self._fail(ex, send, 413, "body_too_large", self._too_large_message())
        ex.mcp_method = _mcp_method(scope, ex.body)
        try:
            route = routing.parse(scope.get("raw_path") or scope["path"].encode())
            ex.user, ex.server = route.user, route.server_id
            await self.inbound.check(scope["headers"], route.user)
            server = self.registry.get(route.server_id)
            if server is None:
                raise routing.RouteError(
                    404, "unknown_server", f"no MCP server {route.server_id!r} is configured on this proxy"
                )
            url = routing.upstream_url(
                server,
                route.subpath,
                scope["query_string"],
                self.registry.announced.get(server.id, frozenset()),
            )
            credential = (
                None if server.auth == "oauth" else credentials.resolve(server, route.user, self.registry)
            )
        except (routing.RouteError, credentials.CredentialUnavailable, inbound.Refused) as exc:
            return await self._fail(ex, send, exc.status, exc.code, exc.message)
        if server.auth == "oauth":
            try:
                credential = await self._oauth_credential(server, route.user)
            except NeedsConsent as exc:
                return await self._ask_consent(ex, send, server, route.user, exc.scopes, exc.reason)
            except TemporarilyUnavailable as exc:
                return await self._unavailable(ex, send, server, exc)
        headers = request_headers(scope, credential, server)
        await self._exchange(ex, server, route, url, headers, body, receive, send)

    async def _exchange(
        self,
        ex: Exchange,
        server: ServerConfig,
        route: routing.Route,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        receive: Receive,
        send: Send,
    ) -> None:
        origin, target = upstream.split_url(url)
        # A streamed body is still being received while the request is sent: only
        # one reader may call receive() at a time, so such requests go unwatched.
        watch_receive = receive if isinstance(body, bytes) else None
        try:
            for attempt in (1, 2):
                started = time.perf_counter()
                answer = await self.pool.request(
                    ex.scope["method"], origin, target, headers, body, self.settings.upstream_timeout
                )
                metrics.upstream_latency(server.id).observe(time.perf_counter() - started)
                if server.auth == "oauth" and answer.status in (401, 403):
                    answer.close()  # its body is not relayed either way below
                    used = next((v for k, v in headers if k == b"authorization"), b"")
                    replay = await self._oauth_rejected(
                        ex,
                        send,
                        server,
                        route.user,
                        answer,
                        attempt,
                        body,
                        used.decode("latin-1").removeprefix("Bearer "),
                    )
                    if replay is None:
                        return
                    headers = request_headers(ex.scope, replay, server)
                    continue
                try:
                    await self._relay(ex, server, route, url, answer, send, watch_receive)
                finally:
                    answer.close()
                return
        except BodyTooLarge:
            await self._fail(ex, send, 413, "body_too_large", self._too_large_message())
        except ClientGone:
            ex.outcome = "client_disconnected"
        except TimeoutError:
            await self._fail(
                ex, send, 504, "upstream_timeout",
                f"server {server.id!r} did not answer within {self.settings.upstream_timeout:g} s; "
                "try again later, or ask the operator to raise upstream_timeout",
                server=server.id,
            )  # fmt: skip
        except upstream.InvalidHeader:
            await self._fail(
                ex, send, 502, "invalid_upstream_header",
                f"the request to server {server.id!r} would carry a header with a line break; "
                "the operator must check the server's API key for stray newlines",
                server=server.id,
            )  # fmt: skip
        except upstream.UpstreamError as exc:
            await self._fail(
                ex, send, 502, "upstream_unreachable",
                f"server {server.id!r} could not be reached ({_describe(exc)}); "
                "check that it is running and that its url in the proxy's config is right",
                server=server.id,
            )  # fmt: skip

    async def _relay(
        self,
        ex: Exchange,
        server: ServerConfig,
        route: routing.Route,
        url: str,
        answer: upstream.Response,
        send: Send,
        watch_receive: Receive | None,
    ) -> None:
        if answer.status == 401 and server.auth in ("none", "api_key"):
            ex.outcome = "upstream_rejected_credential"
            detail = (
                "check the key with `keybearer api-key set " + server.id + "`"
                if server.auth == "api_key"
                else "the server wants credentials: configure it with auth: api_key or oauth"
            )
            return await self._fail(
                ex, send, 502, "upstream_unauthorized",
                f"server {server.id!r} refused the proxy's request as unauthorized (HTTP 401); "
                f"the operator must {detail}",
                server=server.id,
            )  # fmt: skip
        if answer.status in REDIRECTS:
            # Passed on, it would send the agent around the proxy, to an address
            # that is the operator's to know; followed, it would replay a tool call.
            location = answer.header(b"location") or ""
            log.warning("upstream redirected", server=server.id, status=answer.status, location=location)
            return await self._fail(
                ex, send, 502, "upstream_redirected",
                f"server {server.id!r} answered with a redirect (HTTP {answer.status}), which the proxy neither "
                "follows nor passes on; the operator should set the server's url to the address it redirects "
                "to (the proxy's log names it)",
                server=server.id,
            )  # fmt: skip
        is_stream = (answer.header(b"content-type") or "").startswith("text/event-stream")
        ex.status = answer.status
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": response_headers(answer.headers, is_stream),
            }
        )
        rewriter = None
        if is_stream and ex.scope["method"] == "GET" and not route.subpath:
            rewriter = legacy_sse.EndpointRewriter(
                server, url, f"/{route.user}/{route.server_id}", _proxy_origin(ex.scope),
                lambda path: self.registry.note_announced(server.id, path),
            )  # fmt: skip
        if is_stream:
            # Only event streams are watched for the agent going away: an idle one
            # would hold its upstream connection until the next event. Other answers
            # end by themselves, and MCP does not take a disconnect for a cancellation.
            async with DisconnectWatch(watch_receive) if watch_receive else contextlib.nullcontext():
                await self._relay_stream(ex, server, answer, send, rewriter)
        else:
            await self._relay_body(ex, server, answer, send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_body(
        self, ex: Exchange, server: ServerConfig, answer: upstream.Response, send: Send
    ) -> None:
        try:
            while chunk := await answer.read(self.settings.upstream_timeout):
                ex.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (upstream.UpstreamError, TimeoutError) as exc:
            # Headers are gone already: all that is left is to end the body.
            ex.outcome = "upstream_broke_off"
            log.warning("upstream broke off", server=server.id, reason=_describe(exc))

    async def _relay_stream(
        self,
        ex: Exchange,
        server: ServerConfig,
        answer: upstream.Response,
        send: Send,
        rewriter: legacy_sse.EndpointRewriter | None,
    ) -> None:
        """Chunk by chunk, no read timeout: an idle stream is a normal stream."""
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        gauge = metrics.OPEN_STREAMS.labels(server.id)
        gauge.inc()
        try:
            while chunk := await answer.read():
                if rewriter is not None:
                    chunk = rewriter.feed(chunk)
                    if not chunk:
                        continue
                ex.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except legacy_sse.ForeignEndpoint as exc:
            ex.outcome = "foreign_endpoint_refused"
            log.warning("legacy endpoint refused", server=server.id, reason=str(exc))
        except (upstream.UpstreamError, TimeoutError) as exc:
            ex.outcome = "upstream_broke_off"
            log.warning("upstream broke off", server=server.id, reason=_describe(exc))
        except asyncio.CancelledError:
            if not self.draining or task.cancelling() > 1:
                raise
            # Shutting down: end the stream cleanly so the client reconnects elsewhere.
            task.uncancel()
            ex.outcome = "closed_for_shutdown"
        finally:
            gauge.dec()
            self._streams.discard(task)

    def drain(self) -> None:
        """Called on SIGTERM: end every open event stream now."""
        self.draining = True
        for task in list(self._streams):
            task.cancel()

    async def _fail(
        self,
        ex: Exchange,
        send: Send,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        **data: Any,
    ) -> None:
        ex.status, ex.outcome = status, code
        ex.bytes_out = await responses.send_error(
            send, status, code, message, body=ex.body, headers=headers, **data
        )

    # -- OAuth servers ----------------------------------------------------------------

    async def _oauth_credential(self, server: ServerConfig, user: str) -> credentials.Credential:
        if self.oauth is None:
            raise TemporarilyUnavailable("OAuth is not available on this proxy", 60)
        return credentials.bearer(await self.oauth.lifecycle.access_token(server, user))

    async def _oauth_rejected(
        self,
        ex: Exchange,
        send: Send,
        server: ServerConfig,
        user: str,
        answer: upstream.Response,
        attempt: int,
        body: bytes | AsyncIterator[bytes],
        rejected: str,
    ) -> credentials.Credential | None:
        """An OAuth server refused the token: a credential to replay with, or None once answered."""
        assert self.oauth is not None
        challenge = parse_www_authenticate(answer.header_values(b"www-authenticate"))
        if answer.status == 403:
            if challenge is None or challenge.error != "insufficient_scope":
                await self._fail(ex, send, 403, "forbidden", f"server {server.id!r} refused this request (HTTP 403)",
                                 server=server.id)  # fmt: skip
                return None
            await self._step_up(ex, send, server, user, challenge.scope)
            return None
        # 401: the token was revoked or expired early. One refresh and one
        # replay, when the body can be sent again.
        try:
            if attempt == 1 and isinstance(body, bytes):
                return credentials.bearer(await self.oauth.lifecycle.refresh_rejected(server, user, rejected))
            await self.oauth.lifecycle.mark_rejected(server, user)
            raise NeedsConsent("the server rejected the stored token")
        except NeedsConsent as exc:
            await self._ask_consent(ex, send, server, user, (), exc.reason)
        except TemporarilyUnavailable as exc:
            await self._unavailable(ex, send, server, exc)
        return None

    async def _step_up(
        self, ex: Exchange, send: Send, server: ServerConfig, user: str, challenged: tuple[str, ...]
    ) -> None:
        assert self.oauth is not None
        attempts = await self.oauth.lifecycle.count_step_up(server, user)
        if attempts > MAX_STEP_UPS:
            return await self._fail(
                ex, send, 403, "insufficient_scope",
                f"server {server.id!r} still wants more permissions ({' '.join(challenged)}) after {MAX_STEP_UPS} "
                "reconnects; the account may not be allowed them: ask its administrator",
                server=server.id,
            )  # fmt: skip
        granted = await self.oauth.lifecycle.granted_scopes(server, user)
        scopes = tuple(dict.fromkeys((*granted, *challenged)))
        await self._ask_consent(ex, send, server, user, scopes, "the server needs more permissions")

    async def _ask_consent(
        self, ex: Exchange, send: Send, server: ServerConfig, user: str, scopes: tuple[str, ...], reason: str
    ) -> None:
        """The -32042 answer: a signed connect link, in the error data and in its text."""
        url = links.connect_url(
            self.settings.public_url, self.keyring, user, server.id, self.settings.connect_link_ttl, scopes
        )
        message = f"{server.id} needs you to connect your account ({reason}). Open this link in your browser, then retry: {url}"
        ex.status, ex.outcome = 200, "consent_required"
        metrics.CONSENT_REQUIRED.labels(server.id).inc()
        content = responses.elicitation_required(ex.body, server.id, url, message)
        if content is None:
            # Not a JSON-RPC request (a GET stream, a DELETE): no id to answer. 403, never
            # 401: a 401 would start the client's own OAuth discovery against the proxy.
            ex.status = 403
            content = responses.error_body("connection_required", message, connect_url=url, server=server.id)
        await responses.send_json(send, ex.status, content)
        ex.bytes_out = len(content)

    async def _unavailable(
        self, ex: Exchange, send: Send, server: ServerConfig, exc: TemporarilyUnavailable
    ) -> None:
        await self._fail(ex, send, 503, "temporarily_unavailable", exc.message,
                         headers=[(b"retry-after", str(exc.retry_after).encode())], server=server.id)  # fmt: skip

    def _too_large_message(self) -> str:
        return (
            f"the request body is larger than the proxy's limit of {self.settings.max_body_bytes} bytes "
            "(setting max_body_bytes)"
        )


class ClientGone(Exception):
    """The agent closed its connection; the upstream request is abandoned."""


class DisconnectWatch:
    """Cancels the request the moment the agent disconnects.

    Without it an idle event stream would hold its upstream connection until
    the next event tried to reach a client that is no longer there.
    """

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.gone = False
        self._task: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> DisconnectWatch:
        self._owner = asyncio.current_task()
        self._task = asyncio.create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                assert self._owner is not None
                self._owner.cancel()
                return

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        assert self._task is not None and self._owner is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self.gone and exc_type is asyncio.CancelledError:
            self._owner.uncancel()
            raise ClientGone
        return False


def request_headers(
    scope: Scope, credential: credentials.Credential | None, server: ServerConfig
) -> list[tuple[bytes, bytes]]:
    drop = DROP_REQUEST
    connection_tokens: set[bytes] = set()
    host = b""
    out: list[tuple[bytes, bytes]] = []
    for name, value in scope["headers"]:
        if name == b"connection":
            connection_tokens = {t.strip().lower() for t in value.split(b",")}
        elif name == b"host":
            host = value
    for name, value in scope["headers"]:
        if name in drop or name in connection_tokens or (credential and name == credential.header):
            continue
        out.append((name, value))
    client = scope.get("client")
    out.append((b"x-forwarded-for", client[0].encode() if client else b"unknown"))
    out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    if host:
        out.append((b"x-forwarded-host", host))
    # identity: an event stream must reach the agent uncompressed, and the
    # legacy endpoint event must be readable to be rewritten.
    out.append((b"accept-encoding", b"identity"))
    if credential is not None:
        out.append((credential.header, credential.value))
    return out


def response_headers(raw: list[tuple[bytes, bytes]], is_stream: bool) -> list[tuple[bytes, bytes]]:
    """The headers relayed to the agent; `raw` has lower-case names."""
    connection_tokens: set[bytes] = set()
    for name, value in raw:
        if name == b"connection":
            connection_tokens = {t.strip().lower() for t in value.split(b",")}
    out = []
    for name, value in raw:
        if name in DROP_RESPONSE or name in connection_tokens:
            continue
        if is_stream and name == b"content-length":
            continue
        out.append((name, value))
    if is_stream:
        # Tell any buffering proxy in front (nginx) to pass events on at once.
        out = [(n, v) for n, v in out if n != b"x-accel-buffering"]
        out.append((b"x-accel-buffering", b"no"))
        if not any(n == b"cache-control" for n, _ in out):
            out.append((b"cache-control", b"no-cache"))
    return out


async def read_body(scope: Scope, receive: Receive, limit: int, ex: Exchange) -> bytes | AsyncIterator[bytes]:
    """The whole body when it is small and announced; else a capped stream."""
    length: int | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise BodyTooLarge  # unparsable lengths are refused like oversize ones
            length = int(value)
    if length is not None and length > limit:
        raise BodyTooLarge
    if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS") and not length:
        return b""
    if length is not None and length <= WHOLE_BODY_LIMIT:
        chunks = []
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        ex.body = b"".join(chunks)
        ex.bytes_in = len(ex.body)
        return ex.body
    return _stream_body(receive, limit, ex)


async def _stream_body(receive: Receive, limit: int, ex: Exchange) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ex.outcome = "client_disconnected"
            raise ClientGone
        chunk = message.get("body", b"")
        ex.bytes_in += len(chunk)
        if ex.bytes_in > limit:
            ex.outcome = "body_too_large"
            raise BodyTooLarge
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _mcp_method(scope: Scope, body: bytes | None) -> str | None:
    for name, value in scope["headers"]:
        if name == b"mcp-method":
            return value.decode("latin-1")[:64]
    if body and body[:1] == b"{":
        try:
            method = parse_json(body).get("method")
        except (ValueError, AttributeError):
            return None
        return method[:64] if isinstance(method, str) else None
    return None


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if (
            name == b"x-request-id"
            and 0 < len(value) <= 64
            and value.isascii()
            and value.replace(b"-", b"").isalnum()
        ):
            return value.decode()
    return secrets.token_hex(8)


def _proxy_origin(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"host":
            return f"{scope.get('scheme', 'http')}://{value.decode('latin-1')}"
    server = scope.get("server") or ("127.0.0.1", 80)
    return f"{scope.get('scheme', 'http')}://{server[0]}:{server[1]}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, upstream.UpstreamError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
