"""The HTTP/1.1 client the forwarding path uses to reach upstream MCP servers.

A keep-alive pool of asyncio protocols with httptools (llhttp) parsing the
answers. It does only what a reverse proxy needs: send a request with the
headers it is given, hand back the status, the raw headers and the body chunk
by chunk as it arrives, and reuse the connection when the answer allowed it.
No redirects, no cookies, no decompression, no retries.

An upstream is not trusted to be well-behaved: an answer's head is capped in
size, interim (1xx) answers in number, bytes after a complete answer end its
connection, and the idle connections kept per origin are capped.

Through an egress proxy (egress.py), decided once per origin: an https upstream
is reached through a CONNECT tunnel with TLS to the origin inside it; an http
upstream gets its requests in absolute form (`GET http://host/path`) on a
connection to the proxy. Without a proxy configured, a request pays two
comparisons for it.

Why not aiohttp's client, which the OAuth code still uses: per request it
costs about as much CPU as everything else the proxy does together
(docs/performance.md); this one costs a fraction of that, measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import quote, urlsplit

import httptools

from proxy.egress import Egress, ProxyServer
from proxy.errors import UpstreamFailed

# A reader that falls behind stops the upstream socket past this many buffered bytes.
HIGH_WATER = 256 * 1024
# Idle connections older than this are closed rather than reused: shorter than
# the keep-alive timeout of most servers (uvicorn's is 5 s), which narrows the
# window in which a reused connection is closed by the server as we write.
IDLE_SECONDS = 4.0
# An answer's head (status line and headers, or a chunked body's trailers) may
# take this many bytes; more is refused rather than buffered.
MAX_HEAD_BYTES = 64 * 1024
# Interim (1xx) answers accepted before the final one; each costs a parse and nothing more.
MAX_INTERIM = 10
# Idle connections kept per origin; those released past it are closed. A burst of
# requests opens as many connections as it needs, but does not keep them all.
MAX_IDLE_PER_ORIGIN = 100


# uvloop's clock and timers count milliseconds: a timer may fire this much before its time.
_CLOCK_TICK = 0.001

# Methods that mean nothing by a body: an empty one is sent without a Content-Length.
_NO_CONTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class Waiter(Protocol):
    """What a deadline fails: an asyncio future, or the forwarder's lane, which waits without one."""

    def done(self) -> bool: ...

    def set_exception(self, exception: BaseException) -> None: ...


class Watcher(Waiter, Protocol):
    """The forwarder's lane, told of its answer by callbacks instead of awaiting it."""

    def wake(self) -> None:
        """Something of the answer arrived, or the connection failed (`Response.failure`)."""


class UpstreamError(UpstreamFailed):
    """The upstream could not be reached or broke off; the message says which."""


class ConnectFailed(UpstreamError):
    pass


class Disconnected(UpstreamError):
    pass


class InvalidResponse(UpstreamError):
    pass


class InvalidHeader(UpstreamFailed):
    """A header name or value that would split the request (CR, LF or NUL)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    # The Host header's value, made once: the idna codec is Python-level, and
    # every request's head carries it.
    host_header: bytes = field(init=False, repr=False, compare=False)
    # The pool's key for it, made once: a dataclass's own __hash__ is a Python
    # function, and the pool looks an origin up twice a request.
    key: tuple[str, str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        value = (host if self.port == default else f"{host}:{self.port}").encode("idna")
        object.__setattr__(self, "host_header", value)
        object.__setattr__(self, "key", (self.scheme, self.host, self.port))

    @property
    def authority(self) -> bytes:
        """host:port, as a CONNECT request names it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode("idna")


@functools.lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[Origin, bytes]:
    """An absolute http(s) URL as the origin to connect to and the request target."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Characters a request line cannot carry are percent-encoded; existing escapes stay.
    return Origin(parts.scheme, parts.hostname, port), quote(target, safe="!#$%&'()*+,/:;=?@[]~").encode()


class _UpstreamSocket(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream; at most one request on it at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.idle_in: deque[_UpstreamSocket] | None = None
        self.response: Response | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # The deadline of the wait in progress, if it has one, and the timer that enforces it.
        self._timed: Waiter | None = None
        self._timed_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            # Bytes nobody asked for: the connection cannot be trusted again.
            self.close()
            return
        # Counted before parsing, reset by the parser's callbacks whenever a head
        # ends or body arrives: what is left is head bytes still being buffered.
        response._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            if not response.complete:
                # A callback's own refusal says more than the parser's error.
                refusal = exc.__context__
                response._fail(
                    refusal
                    if isinstance(refusal, InvalidResponse)
                    else InvalidResponse(f"the server's answer is not valid HTTP ({exc})")
                )
        else:
            if response._head_bytes > MAX_HEAD_BYTES:
                self.close()
                response._fail(
                    InvalidResponse(f"the server sent more than {MAX_HEAD_BYTES // 1024} KiB of headers")
                )
        if response.status:
            # One wake for whatever these bytes brought (head, body, end), not one per callback.
            response._wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None and (self._timed is None or self._timed.done()):
            # Kept while a wait is on: its deadline holds until something ends that wait.
            self._timer.cancel()
            self._timer = None
        if self.idle_in is not None:
            # Closed by the server while idle: out of the pool at once.
            with contextlib.suppress(ValueError):
                self.idle_in.remove(self)
            self.idle_in = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(Disconnected("the server closed the connection"))
        response = self.response
        if response is not None and not response.complete:
            if response.status and response.delimited_by_close():
                response._complete()
            else:
                response._fail(Disconnected("the server closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        assert self.response is not None
        if self.response.complete:
            # A second answer to one request: parsed, it would add to the first.
            raise InvalidResponse("the server sent more after a complete answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        # Trailers (status already known) are not the answer's headers, which may be relayed already.
        if response.status == 0:
            response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response._head_bytes = 0
        status = self.parser.get_status_code()
        if status < 200:
            # 100 Continue and friends: the real answer follows.
            response._interim += 1
            if response._interim > MAX_INTERIM:
                raise InvalidResponse(f"the server sent more than {MAX_INTERIM} interim answers (1xx)")
            response.headers.clear()
            return
        response.status = status
        if response.method == "HEAD":
            # llhttp cannot be told that a HEAD answer has no body: end it here
            # and never reuse the connection, whose parser would expect one.
            response.keep_alive = False
            response.complete = True

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        if response.status == 0 or response.complete:
            return
        response._head_bytes = 0
        response._chunks.append(body)
        response._size += len(body)
        if response._size > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if response.status == 0 or response.complete:
            return
        response.keep_alive = self.parser.should_keep_alive()
        response.complete = True

    # -- used by Pool and Response

    def send(self, data: bytes) -> bool:
        """Write `data`; True if the caller must then `await drained()`."""
        if self.closed:
            raise Disconnected("the server closed the connection")
        assert self.transport is not None
        self.transport.write(data)
        return self._write_paused

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self.send(data):
            await self.drained(timeout)

    async def drained(self, timeout: float | None) -> None:
        self._drain = self.loop.create_future()
        if timeout:
            self.expire(self._drain, timeout)
        await self._drain

    def expire(self, waiter: Waiter, timeout: float) -> None:
        """Fail `waiter` with TimeoutError unless it is done within `timeout` seconds."""
        # One timer per connection, moved lazily: a wait that ends in time leaves
        # it armed, and when it fires during a later wait it re-arms for that
        # wait's deadline. Each wait then reads the clock instead of arming and
        # cancelling a timer of its own (uvloop: ~5k instructions a request).
        at = self.loop.time() + timeout
        self._timed, self._timed_at = waiter, at
        timer = self._timer
        if timer is None or self._timer_at > at:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(at, self._on_timer)
            self._timer_at = at

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._timed
        if waiter is None or waiter.done():
            self._timed = None
        elif self.loop.time() < self._timed_at - _CLOCK_TICK:
            self._timer = self.loop.call_at(self._timed_at, self._on_timer)
            self._timer_at = self._timed_at
        else:
            self._timed = None
            waiter.set_exception(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An upstream's answer: status and headers once they are in, then the body."""

    __slots__ = (
        "_chunks",
        "_connection",
        "_error",
        "_head_bytes",
        "_interim",
        "_pool",
        "_size",
        "_waiter",
        "complete",
        "headers",
        "keep_alive",
        "method",
        "on_wake",
        "origin",
        "request_sent",
        "status",
    )

    def __init__(self, pool: Pool, origin: Origin, connection: _UpstreamSocket, method: str) -> None:
        self._pool = pool
        self.origin = origin
        self._connection: _UpstreamSocket | None = connection
        self.method = method
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.keep_alive = False
        self.request_sent = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_bytes = 0
        self._interim = 0
        # Called instead of waking a reader, while the forwarder's lane waits without a task.
        self.on_wake: Callable[[], None] | None = None

    def header(self, name: bytes) -> str | None:
        """The first value of a header (name in lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def header_values(self, name: bytes) -> list[str]:
        return [value.decode("latin-1") for key, value in self.headers if key == name]

    @property
    def failure(self) -> UpstreamError | None:
        return self._error

    @property
    def buffered(self) -> int:
        """Body bytes arrived and not yet read."""
        return self._size

    def body_now(self) -> bytes:
        """The body arrived so far, without waiting: the whole of it once `complete`."""
        chunks, self._chunks = self._chunks, []
        # Taken, the bytes no longer count towards HIGH_WATER: reading goes on.
        if self._size > HIGH_WATER and self._connection is not None and self._connection.transport:
            self._connection.transport.resume_reading()
        self._size = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def expire(self, waiter: Waiter, timeout: float | None) -> None:
        """Fail `waiter` unless something ends its wait within `timeout` seconds."""
        if timeout and self._connection is not None:
            self._connection.expire(waiter, timeout)

    def delimited_by_close(self) -> bool:
        """An answer with neither a length nor chunks ends when the connection does."""
        return not any(key in (b"content-length", b"transfer-encoding") for key, _ in self.headers)

    async def read(self, timeout: float | None = None) -> bytes:
        """What has arrived of the body, waiting for more if none has; b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            await self._wait_for_more(timeout)
        return self.body_now()

    def close(self) -> None:
        """Give the connection back when the exchange ended cleanly, else close it."""
        # The lane's waiter holds this response: left here, the two would wait for the
        # cycle collector (a tenth of the proxy's CPU under load) instead of going now.
        self.on_wake = None
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.response = None
        if self.complete and self.keep_alive and self.request_sent and not connection.closed:
            self._pool._release(self.origin, connection)
        else:
            connection.close()

    def _wait_for_more(self, timeout: float | None) -> asyncio.Future[None]:
        """A future the connection completes when something arrives; awaited directly."""
        connection = self._connection
        if connection is None:  # read after close(): nothing will arrive, but the timeout still holds
            waiter = self._waiter = self._pool.loop.create_future()
            if timeout:
                self._pool.loop.call_later(timeout, _expire, waiter)
            return waiter
        waiter = self._waiter = connection.loop.create_future()
        if timeout:
            connection.expire(waiter, timeout)
        return waiter

    # -- called by the connection

    def _wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Pool:
    """Keep-alive connections per origin, created on demand; at most MAX_IDLE_PER_ORIGIN kept idle."""

    def __init__(
        self, connect_timeout: float, ssl_context: ssl.SSLContext | None = None, egress: Egress | None = None
    ) -> None:
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.egress = egress
        # Per origin, decided on first use: the proxy it is reached through, or None.
        self._proxies: dict[Origin, ProxyServer | None] = {}
        # Per origin, oldest first: reuse takes the newest, pruning starts at the oldest.
        self._idle: dict[tuple[str, str, int], deque[_UpstreamSocket]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(
        self,
        method: str,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        timeout: float | None,
    ) -> Response:
        """Send one request; returns once the answer's status and headers are in.

        `timeout` bounds each wait: for the upstream to take more of the body,
        and for the answer's headers. The caller must `close()` the response.
        """
        proxy = self._proxy(origin) if self.egress is not None else None
        if proxy is not None and origin.scheme == "http":
            # No tunnel for plain http: the proxy reads the origin from the request line.
            target = b"http://" + origin.host_header + target
            if proxy.authorization is not None:
                headers = [*headers, (b"proxy-authorization", proxy.authorization)]
        head = _request_head(method, target, origin, headers, body)
        connection = self._idle_connection(origin) or await self._connect(origin, proxy)
        response = Response(self, origin, connection, method)
        connection.response = response
        try:
            if isinstance(body, bytes):
                if len(body) < 16384:
                    # The common case written without a coroutine of its own.
                    if connection.send(head + body):
                        await connection.drained(timeout)
                else:
                    await connection.write(head, timeout)
                    await connection.write(body, timeout)
            else:
                await connection.write(head, timeout)
                async for chunk in body:
                    if chunk:
                        await connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
                await connection.write(b"0\r\n\r\n", timeout)
            response.request_sent = True
            while response.status == 0:
                if response._error is not None:
                    raise response._error
                await response._wait_for_more(timeout)
            if proxy is not None and response.status == 407:
                raise ConnectFailed(
                    f"the egress proxy {proxy} refused the request (HTTP 407); {_CHECK_PROXY}"
                )
        except BaseException:
            response.close()
            raise
        return response

    def send_now(
        self,
        method: str,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        watcher: Watcher,
        timeout: float | None,
    ) -> Response | None:
        """`request` without waiting, for the forwarder's lane: the request written on
        an idle connection, or None (sent nothing) when it would have to wait for one
        (no idle connection, or an egress proxy to go through). `watcher` is told of
        the answer, and failed when it has not begun within `timeout`."""
        if self.egress is not None and self._proxy(origin) is not None:
            return None
        head = _request_head(method, target, origin, headers, body)
        connection = self._idle_connection(origin)
        if connection is None:
            return None
        response = Response(self, origin, connection, method)
        response.on_wake = watcher.wake
        connection.response = response
        # A write the upstream has not taken yet stays in the transport's buffer:
        # at most the one body the lane takes (forwarding.WHOLE_BODY_LIMIT).
        connection.send(head + body)
        response.request_sent = True
        response.expire(watcher, timeout)
        return response

    def _proxy(self, origin: Origin) -> ProxyServer | None:
        try:
            return self._proxies[origin]
        except KeyError:
            assert self.egress is not None
            proxy = self._proxies[origin] = self.egress.proxy_for(origin.scheme, origin.host)
            return proxy

    def _idle_connection(self, origin: Origin) -> _UpstreamSocket | None:
        idle = self._idle.get(origin.key)
        while idle:
            connection = idle.pop()
            connection.idle_in = None
            if not connection.closed and connection.idle_since >= connection.loop.time() - IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, proxy: ProxyServer | None) -> _UpstreamSocket:
        tls = self._tls() if origin.scheme == "https" else None
        through = f" through the egress proxy {proxy}" if proxy is not None else ""
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is not None and tls is not None:
                    return await self._tunnel(origin, proxy, tls)
                _, connection = await self.loop.create_connection(
                    lambda: _UpstreamSocket(self.loop),
                    proxy.host if proxy else origin.host,
                    proxy.port if proxy else origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connection timed out after {self.connect_timeout:g} s{through}") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS failed: {exc.reason or exc}{through}") from None
        except OSError as exc:
            if proxy is not None:
                raise ConnectFailed(
                    f"the egress proxy {proxy} could not be reached ({exc.strerror or exc}); {_CHECK_PROXY}"
                ) from None
            raise ConnectFailed(f"connection failed: {exc.strerror or exc}") from None
        return connection

    async def _tunnel(self, origin: Origin, proxy: ProxyServer, tls: ssl.SSLContext) -> _UpstreamSocket:
        """A CONNECT tunnel through the proxy, then TLS to the origin inside it."""
        transport, handshake = await self.loop.create_connection(
            lambda: _ProxyTunnel(self.loop), proxy.host, proxy.port
        )
        try:
            lines = [b"CONNECT %b HTTP/1.1" % origin.authority, b"host: " + origin.authority]
            if proxy.authorization is not None:
                lines.append(b"proxy-authorization: " + proxy.authorization)
            transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
            status, reason = await handshake.answer
            if not 200 <= status < 300:
                raise ConnectFailed(
                    f"the egress proxy {proxy} refused the tunnel to {origin.authority.decode()} "
                    f"(HTTP {status} {reason}); {_CHECK_PROXY}"
                )
            connection = _UpstreamSocket(self.loop)
            tls_transport = await self.loop.start_tls(transport, connection, tls, server_hostname=origin.host)
        except BaseException:
            transport.close()
            raise
        assert tls_transport is not None
        connection.connection_made(tls_transport)
        return connection

    def _tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def _release(self, origin: Origin, connection: _UpstreamSocket) -> None:
        now = connection.loop.time()
        idle = self._idle.get(origin.key)
        if idle is None:
            idle = self._idle[origin.key] = deque()
        while idle and idle[0].idle_since < now - IDLE_SECONDS:
            stale = idle.popleft()
            stale.idle_in = None
            stale.close()
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            connection.close()
            return
        connection.idle_since = now
        connection.idle_in = idle
        idle.append(connection)

    def idle_count(self, origin: Origin) -> int:
        return len(self._idle.get(origin.key, ()))

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


_CHECK_PROXY = "check HTTPS_PROXY / HTTP_PROXY and the proxy itself"


class _ProxyTunnel(asyncio.Protocol):
    """The CONNECT exchange with an egress proxy: its answer's status, nothing more.
    TLS to the origin then starts on the same socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[tuple[int, str]] = loop.create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self.answer.set_exception(InvalidResponse("the egress proxy's answer to CONNECT is too long"))
            return
        status_line = self._buffer.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
            self.answer.set_exception(InvalidResponse("the egress proxy's answer to CONNECT is not HTTP"))
        elif code.startswith("2") and end + 4 != len(self._buffer):
            # The origin speaks only after our TLS hello: these bytes are the proxy's own.
            self.answer.set_exception(InvalidResponse("the egress proxy sent bytes into the new tunnel"))
        else:
            shown = "".join(c if c.isprintable() else "?" for c in reason[:100])
            self.answer.set_result((int(code), shown))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(Disconnected("the egress proxy closed the connection during CONNECT"))


def _request_head(
    method: str,
    target: bytes,
    origin: Origin,
    headers: list[tuple[bytes, bytes]],
    body: bytes | AsyncIterator[bytes],
) -> bytes:
    parts = [
        _METHODS.get(method) or method.encode("ascii"),
        b" ",
        target,
        b" HTTP/1.1\r\nhost: ",
        origin.host_header,
    ]
    for name, value in headers:
        parts += (b"\r\n", name, b": ", value)
    lines = 2 + len(headers)
    if not isinstance(body, bytes):
        parts.append(b"\r\ntransfer-encoding: chunked")
        lines += 1
    elif body or method not in _NO_CONTENT_METHODS:
        parts += (b"\r\ncontent-length: ", str(len(body)).encode())
        lines += 1
    parts.append(b"\r\n\r\n")
    head = b"".join(parts)
    # One pass in C instead of a check per header: any CR, LF or NUL of our
    # own making would let a header value start a header or a request of its own.
    # (`0 in`, not `b"\0" in`: bytes.__contains__ tries its argument as an int
    # first, and a bytes argument costs a TypeError made and dropped, 2k instructions.)
    if head.count(b"\n") != lines + 1 or head.count(b"\r") != lines + 1 or 0 in head:
        raise InvalidHeader("a request header contains a line break or NUL")
    return head


_METHODS = {m: m.encode() for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
