"""The forwarding path: `/<user>/<server>` in, the upstream's answer out.

A request passes these stages, each a small function below:

    request body -> parse route -> caller check -> find server -> upstream URL
    -> credential (the source of the server's auth type) -> request headers
    -> upstream call -> refused? ask the source (replay, or its answer)
    -> relay response

Most requests take a lane instead of that task (`Forwarder.forward_now`): a
small whole POST body whose credential is at hand (a configured key, a token
this process remembers) is checked and sent upstream by the same functions,
from the agent connection's own parser callback (serving.py), and the
upstream's whole answer is written back from the upstream connection's. No
task, coroutine or ASGI message is made for it; per request that is most of
what Python spends on forwarding (docs/performance.md). Whatever needs a wait
goes the ASGI way instead: before anything is sent, the request itself (the
checks run again there and answer); after, the upstream's answer, handed over
(`_Exchange`) to the same `_forward` the task would have reached.

The forwarder knows no auth type: credentials/ does. Responses are never
buffered: JSON bodies are relayed as they arrive, event streams chunk by
chunk. The agent's `Authorization` and cookies stop here; the credential is
added here and nowhere else. Every answer of the proxy's own is an
errors.Answer, rendered by errors.send_answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import errors, legacy_sse, logs, metrics, routing, tracing, upstream
from proxy.credentials import WAIT, Credential, CredentialSource, Refusal
from proxy.egress import Egress
from proxy.errors import Answer, KeybearerError, TooLarge
from proxy.inbound import InboundAuth
from proxy.registry import Registry
from proxy.settings import ServerConfig, Settings
from proxy.web_origin import WebOriginGuard

log = structlog.get_logger("keybearer.request")

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)  # fmt: skip
# Never sent upstream: the agent's own credentials, what we set ourselves,
# the body's framing, which the upstream client writes, and the Origin the
# proxy already judged (web_origin.py): upstream, the proxy is the client.
DROP_REQUEST = HOP_BY_HOP | {
    b"host", b"authorization", b"cookie", b"content-length", b"accept-encoding",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"expect", b"origin",
}  # fmt: skip
# Never sent back: a challenge would start the agent's own OAuth discovery
# against the proxy; cookies would land on the proxy's origin.
DROP_RESPONSE = HOP_BY_HOP | {b"set-cookie", b"www-authenticate", b"server", b"date"}
# Bodies up to this size are read whole: sent with a Content-Length and
# available to name the JSON-RPC id in an error. Larger ones are streamed.
WHOLE_BODY_LIMIT = 256 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The lane waits for an answer's body up to this size; a longer one is relayed
# as it arrives, by the ASGI way.
LANE_BODY_LIMIT = 64 * 1024


class BodyTooLarge(TooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the request body is larger than the proxy's limit of {limit} bytes",
            next_step="see setting max_body_bytes",
        )


@dataclass(slots=True)
class RequestFacts:
    """One request's facts, for the log line and the error answers."""

    scope: Scope
    request_id: str
    started: int = field(default_factory=time.perf_counter_ns)
    user: str | None = None
    server: str | None = None
    mcp_method: str | None = None
    status: int = 0
    body: bytes | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    outcome: str = "ok"


class Agent(Protocol):
    """The agent's connection, as the lane answers on it (serving.py)."""

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write the whole answer (a Content-Length is added if `headers` lack one)."""

    def hand_over(self, app: ASGIApp) -> None:
        """Go on with this request the ASGI way: `app` gets its scope, an empty body and `send`."""


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        inbound: InboundAuth,
        sources: Mapping[str, CredentialSource],
        web_origin: WebOriginGuard,
        egress: Egress | None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.inbound = inbound
        self.sources = sources
        self.web_origin = web_origin
        self.announced = legacy_sse.AnnouncedPaths()
        self.pool = upstream.Pool(settings.upstream_connect_timeout, egress=egress)
        self.draining = False
        self._streams: set[asyncio.Task[Any]] = set()

    def stop(self) -> None:
        self.pool.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        facts = RequestFacts(scope, _request_id(scope))
        try:
            with tracing.request(scope, facts):
                await self._handle(facts, receive, send)
        finally:
            self._finish(facts)

    def _finish(self, facts: RequestFacts) -> None:
        label = facts.server if facts.server in self.registry.servers else "-"
        metrics.request_counter(label, facts.status).inc()
        logs.request(
            request_id=facts.request_id,
            user=facts.user,
            server=facts.server,
            method=facts.scope["method"],
            mcp_method=facts.mcp_method,
            status=facts.status,
            outcome=facts.outcome,
            # Milliseconds to two decimals, rounded in integers: round(x, 2) costs more.
            duration_ms=(time.perf_counter_ns() - facts.started + 5_000) // 10_000 / 100,
            bytes_in=facts.bytes_in,
            bytes_out=facts.bytes_out,
        )

    def forward_now(self, scope: Scope, body: bytes, agent: Agent) -> bool:
        """The lane: send the request upstream now, if nothing in it needs a wait.

        Called with a POST's whole body (at most WHOLE_BODY_LIMIT), on an untraced
        forwarding path. False when it sent nothing: the request then goes the ASGI
        way (`__call__`), which checks it again and answers whatever stopped it here.
        """
        facts = RequestFacts(scope, _request_id(scope), body=body, bytes_in=len(body))
        if len(body) > self.settings.max_body_bytes or self.web_origin.refusal(scope["headers"]) is not None:
            return False
        try:
            route = routing.parse(scope.get("raw_path") or scope["path"].encode())
        except routing.RouteError:
            return False
        server = self.registry.get(route.server_id)
        if server is None or route.subpath or not self.inbound.check_now(scope["headers"], route.user):
            return False
        source = self.sources[server.credential_kind]
        credential = source.at_hand(server, route.user)
        if credential is WAIT:
            return False
        facts.user, facts.server = route.user, route.server_id
        facts.mcp_method = _mcp_method(scope, body)
        url = routing.upstream_url(server, "", scope["query_string"], frozenset())
        origin, target = upstream.split_url(url)
        exchange = _Exchange(self, facts, server, source, route, url, credential, agent)
        try:
            response = self.pool.send_now(
                scope["method"], origin, target, request_headers(scope, credential), body,
                exchange, self.settings.upstream_timeout,
            )  # fmt: skip
        except upstream.UpstreamFailed:
            return False  # a header the ASGI way refuses with its own answer
        if response is None:
            return False
        exchange.response = response
        return True

    async def _resume(
        self,
        exchange: _Exchange,
        first: upstream.Response | Exception,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """The ASGI way for a request the lane sent, from the upstream's answer (or failure) on."""
        facts = exchange.facts
        try:
            await self._forward(
                facts, exchange.server, exchange.source, exchange.route, exchange.url, exchange.credential,
                facts.body or b"", receive, send, first,
            )  # fmt: skip
        except ClientGone:
            facts.outcome = "client_disconnected"
        except KeybearerError as exc:
            await self._answer(facts, send, exc.answer())
        finally:
            self._finish(facts)

    async def _handle(self, facts: RequestFacts, receive: Receive, send: Send) -> None:
        scope = facts.scope
        refusal = self.web_origin.refusal(scope["headers"])
        if refusal is not None:
            return await self._answer(facts, send, refusal)
        try:
            # Read first, so that every error below can answer a JSON-RPC
            # request with its own id.
            body = await read_body(scope, receive, self.settings.max_body_bytes, facts)
            facts.mcp_method = _mcp_method(scope, facts.body)
            route = routing.parse(scope.get("raw_path") or scope["path"].encode())
            facts.user, facts.server = route.user, route.server_id
            caller_jwt = await self.inbound.check(scope["headers"], route.user)
            server = self.registry.get(route.server_id)
            if server is None:
                raise routing.RouteError(
                    404, "unknown_server", f"no MCP server {route.server_id!r} is configured on this proxy"
                )
            announced = self.announced.get(server) if route.subpath else frozenset()
            url = routing.upstream_url(server, route.subpath, scope["query_string"], announced)
            source = self.sources[server.credential_kind]
            with tracing.span(
                "credential", {"keybearer.server": server.id, "keybearer.auth": server.credential_kind}
            ):
                credential = await source.credential(server, route.user, caller_jwt)
            await self._forward(facts, server, source, route, url, credential, body, receive, send)
        except ClientGone:
            facts.outcome = "client_disconnected"
        except KeybearerError as exc:
            await self._answer(facts, send, exc.answer())

    async def _forward(
        self,
        facts: RequestFacts,
        server: ServerConfig,
        source: CredentialSource,
        route: routing.Route,
        url: str,
        credential: Credential | None,
        body: bytes | AsyncIterator[bytes],
        receive: Receive,
        send: Send,
        first: upstream.Response | Exception | None = None,
    ) -> None:
        """`first`: the lane's answer (or failure) to the first attempt, already sent."""
        origin, target = upstream.split_url(url)
        # A streamed body is still being received while the request is sent: only
        # one reader may call receive() at a time, so such requests go unwatched.
        watch_receive = receive if isinstance(body, bytes) else None
        try:
            for attempt in (1, 2):
                if isinstance(first, Exception):
                    raise first
                response = first or await self._request(facts, server, origin, target, credential, body)
                first = None
                if response.status in (401, 403):
                    refusal = Refusal(
                        response.status, response.header_values(b"www-authenticate"), credential,
                        replayable=attempt == 1 and isinstance(body, bytes), retried=attempt == 2,
                    )  # fmt: skip
                    outcome = await source.rejected(server, route.user, refusal)
                    if outcome is not None:
                        response.close()  # its body is not relayed
                        if isinstance(outcome, Answer):
                            return await self._answer(facts, send, outcome)
                        credential = outcome
                        continue
                try:
                    await self._relay(facts, server, route, url, response, send, watch_receive)
                finally:
                    response.close()
                return
        except TimeoutError:
            await self._answer(facts, send, Answer(
                504, "upstream_timeout",
                f"server {server.id!r} did not answer within {self.settings.upstream_timeout:g} s",
                "try again later, or ask the operator to raise upstream_timeout", data={"server": server.id},
            ))  # fmt: skip
        except upstream.InvalidHeader:
            await self._answer(facts, send, Answer(
                502, "invalid_upstream_header",
                f"the request to server {server.id!r} would carry a header with a line break",
                "the operator must check the server's credential for stray newlines", data={"server": server.id},
            ))  # fmt: skip
        except upstream.InvalidResponse as exc:
            await self._answer(facts, send, Answer(
                502, "upstream_invalid_response", f"server {server.id!r} sent an answer the proxy refuses ({exc})",
                "the operator should check what runs at the server's url", data={"server": server.id},
            ))  # fmt: skip
        except upstream.UpstreamError as exc:
            await self._answer(facts, send, Answer(
                502, "upstream_unreachable", f"server {server.id!r} could not be reached ({_describe(exc)})",
                "check that it is running and that its url in the proxy's config is right",
                data={"server": server.id},
            ))  # fmt: skip

    async def _request(
        self,
        facts: RequestFacts,
        server: ServerConfig,
        origin: upstream.Origin,
        target: bytes,
        credential: Credential | None,
        body: bytes | AsyncIterator[bytes],
    ) -> upstream.Response:
        headers = request_headers(facts.scope, credential)
        started = time.perf_counter()
        with tracing.span("upstream", {"keybearer.server": server.id}, client=True) as span:
            tracing.inject(headers)
            response = await self.pool.request(
                facts.scope["method"], origin, target, headers, body, self.settings.upstream_timeout
            )
            span.set_attribute("http.response.status_code", response.status)
        metrics.upstream_latency(server.id).observe(time.perf_counter() - started)
        return response

    async def _relay(
        self,
        facts: RequestFacts,
        server: ServerConfig,
        route: routing.Route,
        url: str,
        response: upstream.Response,
        send: Send,
        watch_receive: Receive | None,
    ) -> None:
        if response.status in REDIRECTS:
            # Passed on, it would send the agent around the proxy, to an address
            # that is the operator's to know; followed, it would replay a tool call.
            location = response.header(b"location") or ""
            log.warning("upstream redirected", server=server.id, status=response.status, location=location)
            return await self._answer(facts, send, Answer(
                502, "upstream_redirected",
                f"server {server.id!r} answered with a redirect (HTTP {response.status}), which the proxy "
                "neither follows nor passes on",
                "the operator should set the server's url to the address it redirects to (the proxy's log "
                "names it)",
                data={"server": server.id},
            ))  # fmt: skip
        is_stream = (response.header(b"content-type") or "").startswith("text/event-stream")
        facts.status = response.status
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response_headers(response.headers, is_stream),
            }
        )
        rewriter = None
        if is_stream and facts.scope["method"] == "GET" and not route.subpath:
            rewriter = legacy_sse.EndpointRewriter(
                server, url, f"/{route.user}/{route.server_id}", _proxy_origin(facts.scope),
                lambda path: self.announced.note(server, path),
            )  # fmt: skip
        if is_stream:
            # Only event streams are watched for the agent going away: an idle one
            # would hold its upstream connection until the next event. Other answers
            # end by themselves, and MCP does not take a disconnect for a cancellation.
            async with DisconnectWatch(watch_receive) if watch_receive else contextlib.nullcontext():
                await self._relay_stream(facts, server, response, send, rewriter)
        else:
            await self._relay_body(facts, server, response, send)
        # A body the upstream broke off is left unended: uvicorn then closes the agent's
        # connection without the final chunk, so a cut-short answer never looks complete.
        if facts.outcome != "upstream_broke_off":
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_body(
        self, facts: RequestFacts, server: ServerConfig, response: upstream.Response, send: Send
    ) -> None:
        try:
            while chunk := await response.read(self.settings.upstream_timeout):
                facts.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (upstream.UpstreamError, TimeoutError) as exc:
            # Headers are gone already: all that is left is to abort the body (see _relay).
            facts.outcome = "upstream_broke_off"
            log.warning("upstream broke off", server=server.id, reason=_describe(exc))

    async def _relay_stream(
        self,
        facts: RequestFacts,
        server: ServerConfig,
        response: upstream.Response,
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
            while chunk := await response.read():
                if rewriter is not None:
                    chunk = rewriter.feed(chunk)
                    if not chunk:
                        continue
                facts.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except legacy_sse.ForeignEndpoint as exc:
            facts.outcome = exc.code
            log.warning("legacy endpoint refused", server=server.id, reason=str(exc))
        except (upstream.UpstreamError, TimeoutError) as exc:
            facts.outcome = "upstream_broke_off"
            log.warning("upstream broke off", server=server.id, reason=_describe(exc))
        except asyncio.CancelledError:
            if not self.draining or task.cancelling() > 1:
                raise
            # Shutting down: end the stream cleanly so the client reconnects elsewhere.
            task.uncancel()
            facts.outcome = "closed_for_shutdown"
        finally:
            gauge.dec()
            self._streams.discard(task)

    def drain(self) -> None:
        """Called on SIGTERM: end every open event stream now."""
        self.draining = True
        for task in list(self._streams):
            task.cancel()

    async def _answer(self, facts: RequestFacts, send: Send, answer: Answer) -> None:
        facts.outcome = answer.code
        facts.status, facts.bytes_out = await errors.send_answer(send, answer, facts.body)


@dataclass(slots=True, eq=False)
class _Exchange:
    """A request the lane sent, waiting for its answer without a task.

    The upstream connection calls `wake` whenever bytes of the answer arrived,
    and `set_exception` when its deadline passed first (it stands in for the
    future a task would await). A whole answer that needs nothing more is
    written back here; anything else (a refusal to ask the credential source
    about, a redirect, an event stream, a long body, a failure) is handed over
    to `Forwarder._resume`, the ASGI way, which relays or answers it.
    """

    forwarder: Forwarder
    facts: RequestFacts
    server: ServerConfig
    source: CredentialSource
    route: routing.Route
    url: str
    credential: Credential | None
    agent: Agent
    response: upstream.Response | None = None
    started: float = field(default_factory=time.perf_counter)
    over: bool = False

    def done(self) -> bool:
        return self.over

    def set_exception(self, exception: BaseException) -> None:
        """The upstream's deadline passed before its answer did."""
        assert isinstance(exception, Exception)
        self._hand_over(exception)

    def wake(self) -> None:
        response = self.response
        if self.over or response is None:
            return
        if response.failure is not None and not response.status:
            return self._hand_over(response.failure)
        if not response.status:
            return  # an interim (1xx) answer
        if (
            response.failure is not None
            or response.status in (401, 403)
            or response.status in REDIRECTS
            or (response.header(b"content-type") or "").startswith("text/event-stream")
        ):
            return self._hand_over(response)
        if response.complete:
            return self._reply(response)
        if response.buffered > LANE_BODY_LIMIT:
            return self._hand_over(response)
        # The rest of the body, within the same deadline for each wait the ASGI way has.
        response.expire(self, self.forwarder.settings.upstream_timeout)

    def _reply(self, response: upstream.Response) -> None:
        self.over = True
        facts = self.facts
        metrics.upstream_latency(self.server.id).observe(time.perf_counter() - self.started)
        body = response.body_now()
        facts.status, facts.bytes_out = response.status, len(body)
        headers = response_headers(response.headers, False)
        response.close()
        self.agent.respond(response.status, headers, body)
        self.forwarder._finish(facts)

    def _hand_over(self, first: upstream.Response | Exception) -> None:
        self.over = True
        response = self.response
        assert response is not None
        response.on_wake = None
        if isinstance(first, Exception):
            response.close()
        else:
            metrics.upstream_latency(self.server.id).observe(time.perf_counter() - self.started)
        self.agent.hand_over(functools.partial(self.forwarder._resume, self, first))


class ClientGone(KeybearerError):
    """The agent closed its connection; the upstream request is abandoned."""

    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("the agent closed its connection")


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


def request_headers(scope: Scope, credential: Credential | None) -> list[tuple[bytes, bytes]]:
    drop = DROP_REQUEST if credential is None else _drop_also(credential.header)
    connection_tokens: set[bytes] = set()
    host = b""
    out: list[tuple[bytes, bytes]] = []
    # One pass: what is dropped is looked at for what it says, the rest kept as it is.
    for header in scope["headers"]:
        name = header[0]
        if name not in drop:
            out.append(header)
        elif name == b"host":
            host = header[1]
        elif name == b"connection":
            connection_tokens |= {t.strip().lower() for t in header[1].split(b",")}
    if connection_tokens:
        out = [header for header in out if header[0] not in connection_tokens]
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


@functools.lru_cache(maxsize=64)
def _drop_also(header: bytes) -> frozenset[bytes]:
    """DROP_REQUEST and the credential's header (the agent's own value of it stops here too)."""
    return DROP_REQUEST | {header}


def response_headers(raw: list[tuple[bytes, bytes]], is_stream: bool) -> list[tuple[bytes, bytes]]:
    """The headers relayed to the agent; `raw` has lower-case names."""
    connection_tokens: set[bytes] = set()
    for name, value in raw:
        if name == b"connection":
            connection_tokens |= {t.strip().lower() for t in value.split(b",")}
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


async def read_body(
    scope: Scope, receive: Receive, limit: int, facts: RequestFacts
) -> bytes | AsyncIterator[bytes]:
    """The whole body when it is small and announced; else a capped stream."""
    length: int | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise BodyTooLarge(limit)  # unparsable lengths are refused like oversize ones
            length = int(value)
    if length is not None and length > limit:
        raise BodyTooLarge(limit)
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
        facts.body = b"".join(chunks)
        facts.bytes_in = len(facts.body)
        return facts.body
    return _stream_body(receive, limit, facts)


async def _stream_body(receive: Receive, limit: int, facts: RequestFacts) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            facts.outcome = "client_disconnected"
            raise ClientGone
        chunk = message.get("body", b"")
        facts.bytes_in += len(chunk)
        if facts.bytes_in > limit:
            facts.outcome = "body_too_large"
            raise BodyTooLarge(limit)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


# A JSON-RPC request as clients write it: its method among the object's first
# members, after at most its jsonrpc and id. ASCII without escapes only.
_METHOD_NEAR_FRONT = re.compile(
    rb'\{[ \t\n\r]*(?:"(?:jsonrpc|id)"[ \t\n\r]*:[ \t\n\r]*(?:-?\d{1,20}|"[\x20\x21\x23-\x5b\x5d-\x7e]{0,64}")'
    rb'[ \t\n\r]*,[ \t\n\r]*){0,2}"method"[ \t\n\r]*:[ \t\n\r]*"([\x20\x21\x23-\x5b\x5d-\x7e]{1,64})"'
)


def _mcp_method(scope: Scope, body: bytes | None) -> str | None:
    for name, value in scope["headers"]:
        if name == b"mcp-method":
            return value.decode("latin-1")[:64]
    if body and body[:1] == b"{":
        # Parsing the body is most of this function's cost. Where the member found
        # near the front is the body's only "method" (no other one written out, none
        # spelt with escapes), it is the one a parse would find. A body that is not
        # JSON past that point is logged with the method it names; upstream refuses it.
        front = _METHOD_NEAR_FRONT.match(body)
        if front is not None and body.count(b'"method"') == 1 and b"\\u" not in body:
            return front.group(1).decode("ascii")
        message = errors.parse_json(body)
        method = message.get("method") if isinstance(message, dict) else None
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
    # A log correlation id, not a secret: the random module's generator (seeded
    # from os.urandom, and again in a forked child) makes one without the
    # getrandom(2) system call per request that secrets.token_hex costs.
    return f"{random.getrandbits(64):016x}"


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
