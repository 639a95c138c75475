"""Inbound HTTP/1.1 connections, bounded before any request reaches the app.

Caller authentication runs in the app, so it only ever sees a request whose
head (request line and headers) has been read in full. Until then uvicorn's
httptools protocol keeps every header byte a client sends, for as long as it
takes to send them, on as many connections as it opens. This protocol adds
three limits in front of the app:

- a request head larger than `max_header_bytes` gets 431 and the connection closes;
- a head that is not complete `header_timeout` seconds after its first byte (or,
  for a connection's first request, after the connection opened) gets 408 and
  the connection closes; the clock stops once the head is in, so request bodies
  and long responses such as event streams are not bound by it (a request
  pipelined behind a response in progress gets its clock when that response ends);
- beyond `max_connections` open connections, a new one is closed at once.

Idle keep-alive connections between requests are closed after uvicorn's
`timeout_keep_alive` (5 s), as uvicorn does, but with one timer per connection,
moved lazily, instead of one set and cancelled per request. Each limit holds
per worker process.

It is also where the forwarder's lane (forwarding.py `forward_now`) starts: a
POST with a small body is held here instead of starting uvicorn's request
cycle and task, and offered whole to the lane, which forwards it and later
answers through `respond`, or hands it over (`hand_over`) to a request cycle
made then. A request the lane does not take gets its cycle at once, body and
all, as uvicorn would have made it. While the lane has a request, a stand-in
for its cycle (`_LaneRequest`) keeps uvicorn's pipelining, shutdown and
disconnect handling working as they do for a cycle.

It also sends each answer in as few writes as it can: uvicorn writes the status
line and headers, then every body chunk, each with a system call of its own
(on loopback each one also runs the receiver's side of TCP, on this core). The
request's writes are held until the answer is complete, and at most until the
end of the event loop's current pass (`_Cork`), so an event stream's events
still go out at once.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol, cast

import httptools
import structlog
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from proxy.errors import Answer, json_content
from proxy.forwarding import WHOLE_BODY_LIMIT, Agent
from proxy.settings import Settings

log = structlog.get_logger("keybearer.serving")
# Refusals are logged at most this often per kind and process: a flood of them
# must not become a flood of log lines.
LOG_INTERVAL = 5.0
# How long a refused connection's further bytes are read and dropped.
LINGER = 2.0
# uvloop's clock and timers count milliseconds: a timer may fire this much before its time.
_CLOCK_TICK = 0.001


@dataclass(frozen=True)
class InboundLimits:
    max_header_bytes: int
    header_timeout: float
    max_connections: int


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """What `uvicorn.run(http=...)` takes: the protocol with these settings' limits.

    A partial of a module-level class pickles, so it also reaches the worker
    processes uvicorn spawns for `workers` > 1.
    """
    limits = InboundLimits(settings.max_header_bytes, settings.header_timeout, settings.max_connections)
    # uvicorn only calls it with keyword arguments, as it would a class.
    return cast(type[asyncio.Protocol], functools.partial(LimitedHttpToolsProtocol, limits=limits))


class _Throttled:
    """One warning per LOG_INTERVAL, saying how many events it stands for."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.count = 0
        self.logged_at = -math.inf

    def note(self, **fields: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_INTERVAL:
            log.warning(self.event, count=self.count, **fields)
            self.count, self.logged_at = 0, now


_refused = _Throttled("connections_refused")
_head_too_large = _Throttled("request_head_too_large")
_head_too_slow = _Throttled("request_head_too_slow")


class _Cork:
    """The transport uvicorn's request cycle writes to: writes made within one pass
    of the event loop go out as one. The protocol flushes it when an answer is
    complete; a pass that ends first (an event stream, a slow body) flushes it then."""

    __slots__ = ("_loop", "_pending", "_scheduled", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            # The agent may have gone since these were held: uvicorn writes nothing then.
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class Lane(Protocol):
    """The app's side of the lane: `Keybearer.forward_now`."""

    def __call__(self, scope: Any, body: bytes, agent: Agent) -> bool: ...


class _NoEvent:
    """uvicorn sets its cycle's message event on a disconnect: the lane's has no waiter."""

    @staticmethod
    def set() -> None:
        pass


class _LaneRequest:
    """Stands in for uvicorn's RequestResponseCycle while the lane has the request:
    the attributes uvicorn's protocol reads and writes on `self.cycle`."""

    __slots__ = ("disconnected", "keep_alive", "response_complete", "scope")
    message_event = _NoEvent

    def __init__(self, scope: Any, keep_alive: bool) -> None:
        self.scope = scope
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: InboundLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # Bytes received towards the next request head; None while a request's
        # body is being read, which the app bounds itself.
        self.head_bytes: int | None = 0
        # The connection's one timer: its head's deadline, or the end of its
        # lingering once refused.
        self.deadline: asyncio.TimerHandle | None = None
        self.refused = False
        self.cork: _Cork | None = None
        # The app's lane, if it has one; a held body's chunks; the lane's request.
        self.lane: Lane | None = getattr(self.app, "forward_now", None)
        self.held: list[bytes] | None = None
        self.lane_request: _LaneRequest | None = None
        # When the connection's last answer ended, while no request is under way.
        self.idle_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            _refused.note(
                max_connections=self.limits.max_connections,
                hint="raise max_connections, add replicas, or cap connections per client in front",
            )
            transport.close()
            return
        super().connection_made(transport)
        self.cork = _Cork(transport, self.loop)
        # A connection that never sends a byte must not hold its place either.
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # refused in connection_made
            return
        self._stop_clock()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self.lane_request is not None:  # uvicorn marks only `self.cycle`, maybe a later request
            self.lane_request.disconnected = True
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.head_bytes is None:  # a request body, which the app bounds
            super().data_received(data)
            return
        # Idle, these are the next request's first bytes (uvicorn's keep-alive
        # timer stops at any byte, even a lone CRLF): its head's clock starts now.
        idle = self.cycle is None or self.cycle.response_complete
        limit = self.limits.max_header_bytes
        if self.head_bytes + len(data) <= limit:
            self.head_bytes += len(data)
            super().data_received(data)
            # A head that arrived whole (the usual case) needs no clock: one is armed,
            # from this same moment, only for a head still incomplete after this read.
            if idle and self.head_bytes and not self.transport.is_closing():
                self._start_head_clock()
            return
        if idle:
            self._start_head_clock()
        # Parse only what the head may still take. If the head ends within it,
        # the count is reset, and the rest is body or the next request. (That
        # next request's first bytes within `room` go uncounted: at most one limit.)
        room = limit - self.head_bytes
        self.head_bytes = limit
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self.head_bytes == limit:
            _head_too_large.note(client=self._client(), max_header_bytes=self.limits.max_header_bytes)
            self._refuse(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                f"the request line and headers are larger than the proxy's limit of "
                f"{self.limits.max_header_bytes} bytes (setting max_header_bytes); send fewer or shorter headers",
            )
            return
        self.data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._stop_clock()
        self.head_bytes = None
        if self.lane is not None and self._lane_may_take():
            self.held = []
            return
        self._start_cycle()

    def _start_cycle(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = cast(asyncio.Transport, self.cork)

    def _lane_may_take(self) -> bool:
        """A POST whose whole body is announced and small, nothing before it unanswered,
        and an agent reading what it is sent: what the lane can take."""
        if (
            self.parser.get_method() != b"POST"
            or self.expect_100_continue
            or not (self.cycle is None or self.cycle.response_complete)
            or self.flow.write_paused
            or self.parser.get_http_version() != "1.1"
            or self.parser.should_upgrade()
        ):
            return False
        for name, value in self.headers:
            if name == b"content-length":
                if not (value.isdigit() and int(value) <= WHOLE_BODY_LIMIT):
                    return False
                break
        else:
            return False
        # As uvicorn's on_headers_complete fills them.
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        scope = self.scope
        scope["method"] = "POST"
        scope["path"] = self.root_path + (urllib.parse.unquote(path) if "%" in path else path)
        scope["raw_path"] = self.root_path.encode("ascii") + url.path
        scope["query_string"] = url.query or b""
        return True

    def on_body(self, body: bytes) -> None:
        if self.held is not None:
            self.held.append(body)  # at most its Content-Length, which llhttp holds it to
        else:
            super().on_body(body)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        request = self.lane_request
        assert request is not None
        self.lane_request = None
        request.response_complete = True
        if not request.disconnected:
            head = [STATUS_LINE[status]]
            length = False
            for name, value in headers:
                head += (name, b": ", value, b"\r\n")
                length = length or name == b"content-length"
            if not length and status not in (204, 304):
                head.append(b"content-length: %d\r\n" % len(body))
            if not request.keep_alive:
                head.append(b"connection: close\r\n")
            head += (b"\r\n", body)
            lines = len(headers) + 2 + (not length and status not in (204, 304)) + (not request.keep_alive)
            data = b"".join(head)
            end = len(data) - len(body)
            # One pass in C for what uvicorn checks header by header: a CR or LF in a
            # relayed header would start a header (or an answer) of its own. (llhttp
            # already refuses other control characters in what the upstream sent.)
            if data.count(b"\n", 0, end) != lines or data.count(b"\r", 0, end) != lines:
                self.transport.close()
            else:
                self.transport.write(data)
                if not request.keep_alive:
                    self.transport.close()
        self.on_response_complete()

    def hand_over(self, app: ASGIApp) -> None:
        request = self.lane_request
        assert request is not None
        self.lane_request = None
        cycle = RequestResponseCycle(
            scope=request.scope,
            transport=cast(asyncio.Transport, self.cork),
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=request.keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.more_body = False
        cycle.disconnected = request.disconnected
        if self.cycle is request:  # else a pipelined request's cycle is already current
            self.cycle = cycle
        # As uvicorn starts a cycle's task, minus its reset_contextvars option, not set here.
        task = self.loop.create_task(cycle.run_asgi(app))  # type: ignore[arg-type]  # starlette's ASGI types
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_response_complete(self) -> None:
        # The whole answer, in one write, before the next request's may start.
        assert self.cork is not None
        self.cork.flush()
        # uvicorn's, but for its keep-alive timer (see _unset_keepalive_if_required).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(
                self.idle_since + self.timeout_keep_alive, self._keep_alive_check
            )

    def _unset_keepalive_if_required(self) -> None:
        # Called by uvicorn on every read: the connection is no longer idle. Its timer
        # stays armed (about 8k instructions a request to cancel and set again), and
        # when it fires it closes the connection only if it has been idle long enough.
        self.idle_since = None

    def _keep_alive_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:
            return  # busy: armed again when its answer is complete
        due = self.idle_since + self.timeout_keep_alive
        if self.loop.time() < due - _CLOCK_TICK:
            self.timeout_keep_alive_task = self.loop.call_at(due, self._keep_alive_check)
        else:
            self.timeout_keep_alive_handler()

    def on_message_complete(self) -> None:
        self.head_bytes = 0
        held = self.held
        if held is None:
            super().on_message_complete()
            return
        self.held = None
        body = held[0] if len(held) == 1 else b"".join(held)
        assert self.lane is not None
        if self.lane(self.scope, body, self):
            # The lane answers later, from the upstream's callbacks: never from within this call.
            request = _LaneRequest(self.scope, self.parser.should_keep_alive())
            self.cycle, self.lane_request = request, request  # type: ignore[assignment]
            return
        self._start_cycle()
        self.cycle.body += body
        self.cycle.more_body = False
        self.cycle.message_event.set()

    def _start_head_clock(self) -> None:
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _stop_clock(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        _head_too_slow.note(client=self._client(), header_timeout=self.limits.header_timeout)
        self._refuse(
            HTTPStatus.REQUEST_TIMEOUT,
            "header_timeout",
            f"the request line and headers did not arrive within {self.limits.header_timeout:g} s "
            "(setting header_timeout); send them at once, then the body",
        )

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> None:
        """Answer `status` and close, unless another response is under way (pipelining): then just close."""
        self._stop_clock()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        _, body = json_content(Answer(status, code, message))
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        # Closing with the client's bytes unread would reset the connection, and
        # a client still sending would never read the answer: half-close, and drop
        # what it sends for a moment.
        self.transport.write_eof()
        self.refused = True
        self.deadline = self.loop.call_later(LINGER, self.transport.close)

    def _client(self) -> str | None:
        return self.client[0] if self.client else None
