"""proxy/upstream.py, the forwarding path's HTTP/1.1 client, against raw servers on loopback.

Each server here writes its answer byte by byte as given, so that the framings a
real upstream may choose (lengths, chunks, close-delimited, HEAD, 1xx, TLS) and
its misbehaviour (garbage, early close, silence) are each met once. The hostile
upstream (tests/peers/hostile_upstream.py) then tries each way to exhaust the
client, and Hypothesis feeds the parser arbitrary and well-formed answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from peers.hostile_upstream import FLOOD_BYTES, OK_BODY, HostileUpstream, answer, read_request
from support import self_signed_certificate

from proxy import upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback TCP server; records each request head and counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.origin = upstream.Origin("http", "127.0.0.1", 0)

    async def __aenter__(self) -> RawServer:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.origin = upstream.Origin("https" if self.tls else "http", "127.0.0.1", port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()


async def exchange(
    pool: upstream.Pool,
    origin: upstream.Origin,
    body: bytes | AsyncIterator[bytes] = b"{}",
    *,
    method: str = "POST",
    target: bytes = b"/mcp",
    timeout: float = 5,
) -> bytes:
    response = await pool.request(
        method, origin, target, [(b"content-type", b"application/json")], body, timeout
    )
    try:
        return await read_all(response)
    finally:
        response.close()


async def read_all(response: upstream.Response) -> bytes:
    chunks = []
    while chunk := await response.read(5):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_keep_alive_reuses_one_connection_and_sends_the_headers_given() -> None:
    heads = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            heads.append(head)
            writer.write(answer(b"echo:" + body))

    async with RawServer(handler) as server:
        pool = upstream.Pool(5)
        for i in range(5):
            assert await exchange(pool, server.origin, b'{"n":%d}' % i) == b'echo:{"n":%d}' % i
        pool.close()
    assert server.connections == 1
    first = heads[0].split(b"\r\n")
    assert first[0] == b"POST /mcp HTTP/1.1"
    assert b"host: 127.0.0.1:%d" % server.origin.port in first
    assert b"content-type: application/json" in first
    assert b"content-length: 7" in first


async def test_chunked_and_close_delimited_answers_are_read_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await read_request(reader)  # the connection is reused for the next one
        writer.write(answer(b"second"))

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await writer.drain()

    pool = upstream.Pool(5)
    async with RawServer(chunked) as server:
        assert await exchange(pool, server.origin) == b"hello chunked world"
        assert await exchange(pool, server.origin) == b"second"
        assert server.connections == 1
    async with RawServer(close_delimited) as server:
        assert await exchange(pool, server.origin) == b"until the end"
        assert await exchange(pool, server.origin) == b"until the end"
        assert server.connections == 2  # never reused after connection: close
    pool.close()


async def test_head_answers_end_at_their_headers_and_1xx_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"after continue"))

    async with RawServer(handler) as server:
        pool = upstream.Pool(5)
        assert await exchange(pool, server.origin, b"", method="HEAD") == b""
        assert await exchange(pool, server.origin) == b"after continue"
        pool.close()


async def test_a_streamed_body_goes_chunked_and_a_large_one_whole() -> None:
    received = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            received.append((head, body))
            writer.write(answer(b"%d" % len(body)))

    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([65 + i % 26]) * 10_000

    big = b"x" * 3_000_000
    async with RawServer(handler) as server:
        pool = upstream.Pool(5)
        assert await exchange(pool, server.origin, parts()) == b"500000"
        assert await exchange(pool, server.origin, big) == b"3000000"
        pool.close()
    assert b"transfer-encoding: chunked" in received[0][0]
    assert received[0][1] == b"".join([bytes([65 + i % 26]) * 10_000 for i in range(50)])
    assert received[1][1] == big


async def test_a_slow_reader_pauses_the_upstream_and_loses_nothing() -> None:
    payload = bytes(range(256)) * 40_000  # 10 MB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(payload))
        await writer.drain()

    async with RawServer(handler) as server:
        pool = upstream.Pool(5)
        response = await pool.request("GET", server.origin, b"/big", [], b"", 5)
        got = bytearray()
        peak = 0
        while chunk := await response.read(5):
            got += chunk
            peak = max(peak, len(chunk))
            await asyncio.sleep(0.002)
        response.close()
        pool.close()
    assert bytes(got) == payload
    # Reading stopped at the high-water mark, so no single read holds the whole body.
    assert peak < len(payload) // 4


async def test_line_breaks_in_a_header_are_refused_before_anything_is_sent() -> None:
    async with RawServer(lambda r, w: read_request(r)) as server:
        pool = upstream.Pool(5)
        for bad in (b"key\r\nx-injected: 1", b"key\nx: 1", b"key\0"):
            with pytest.raises(upstream.InvalidHeader):
                await pool.request("POST", server.origin, b"/mcp", [(b"x-api-key", bad)], b"{}", 5)
        pool.close()
        assert server.connections == 0


async def test_failures_say_what_happened() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    pool = upstream.Pool(5)
    async with RawServer(garbage) as server:
        with pytest.raises(upstream.InvalidResponse, match="not valid HTTP"):
            await exchange(pool, server.origin)
    async with RawServer(hang_up) as server:
        with pytest.raises(upstream.Disconnected, match="closed the connection"):
            await exchange(pool, server.origin)
    async with RawServer(silent) as server:
        with pytest.raises(TimeoutError):
            await exchange(pool, server.origin, timeout=0.2)
        closed = server.origin  # nothing listens there once the block ends
    with pytest.raises(upstream.ConnectFailed, match="connection failed"):
        await exchange(pool, closed)
    pool.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        # Closes as an idle keep-alive timeout would.

    async with RawServer(one_then_close) as server:
        pool = upstream.Pool(5)
        assert await exchange(pool, server.origin) == b"ok"
        await asyncio.sleep(0.1)
        assert pool.idle_count(server.origin) == 0  # dropped when the server closed it
        assert await exchange(pool, server.origin) == b"ok"
        pool.close()
    assert server.connections == 2


async def deadlines_on_one_connection() -> None:
    # How long the server takes over each request; "body" and "head" never end that part.
    delays = iter([0.0, 0.25, 0.0, "body", "head"])

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            delay = next(delays)
            if isinstance(delay, float):
                await asyncio.sleep(delay)
                writer.write(answer(b"ok"))
                continue
            if delay == "body":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok")
            await asyncio.sleep(5)

    loop = asyncio.get_running_loop()
    async with RawServer(handler) as server:
        pool = upstream.Pool(5)
        assert await exchange(pool, server.origin, timeout=0.3) == b"ok"
        await asyncio.sleep(0.2)
        # The first request's deadline passes during this one, which has time left.
        assert await exchange(pool, server.origin, timeout=0.3) == b"ok"
        assert await exchange(pool, server.origin, timeout=30) == b"ok"
        # A shorter timeout after a longer one on the same connection still holds.
        response = await pool.request("GET", server.origin, b"/", [], b"", 30)
        assert await response.read(0.2) == b"ok"
        started = loop.time()
        with pytest.raises(TimeoutError):
            await response.read(0.2)
        assert 0.15 < loop.time() - started < 1
        response.close()
        assert server.connections == 1
        # And on a connection of its own, the head's wait too.
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("GET", server.origin, b"/", [], b"", 0.2)
        assert 0.15 < loop.time() - started < 1
        pool.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_wait_has_its_own_deadline_on_a_reused_connection(loop: str) -> None:
    # The production loop too: uvloop's timers are its own.
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(deadlines_on_one_connection())


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_path, key_path = self_signed_certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))


async def test_https_upstreams_are_verified(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"over tls"))
        await writer.drain()

    async with RawServer(handler, tls=server_tls) as server:
        trusting = upstream.Pool(5, ssl_context=client_tls)
        assert await exchange(trusting, server.origin) == b"over tls"
        trusting.close()
        default = upstream.Pool(5)  # the system's CAs do not know this certificate
        with pytest.raises(upstream.ConnectFailed, match="TLS failed"):
            await exchange(default, server.origin)
        default.close()


def test_urls_split_into_origin_and_target() -> None:
    assert upstream.split_url("http://127.0.0.1:8000/mcp?x=1") == (
        upstream.Origin("http", "127.0.0.1", 8000),
        b"/mcp?x=1",
    )
    origin, target = upstream.split_url("https://[::1]/a b")
    assert origin == upstream.Origin("https", "::1", 443) and target == b"/a%20b"
    assert origin.host_header == b"[::1]"
    assert upstream.Origin("http", "example.com", 8080).host_header == b"example.com:8080"
    with pytest.raises(ValueError):
        upstream.split_url("ftp://example.com/")


async def test_connections_idle_too_long_are_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Servers close idle keep-alive connections on their own timer (uvicorn after 5 s);
    # reusing one near that moment races the server's close.
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.2)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer(b"ok"))

    async with RawServer(handler) as server:
        pool = upstream.Pool(5)
        await exchange(pool, server.origin)
        await exchange(pool, server.origin)
        assert server.connections == 1
        await asyncio.sleep(0.3)
        await exchange(pool, server.origin)
        assert server.connections == 2
        pool.close()


# -- A hostile upstream (tests/peers/hostile_upstream.py): each way it could exhaust the proxy.


def origin_of(peer: HostileUpstream) -> upstream.Origin:
    return upstream.Origin("http", "127.0.0.1", peer.port)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["endless-headers", "endless-header-value"])
async def test_an_endless_head_is_refused_at_64_kib_and_its_connection_closed(mode: str) -> None:
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        with pytest.raises(upstream.InvalidResponse, match="more than 64 KiB of headers"):
            await exchange(pool, origin_of(peer), target=b"/" + mode.encode())
        await until(lambda: peer.ended == 1, "the client hung up")
        assert peer.flooded < FLOOD_BYTES
        assert pool.idle_count(origin_of(peer)) == 0
        pool.close()


async def test_a_flood_of_interim_answers_is_refused() -> None:
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        with pytest.raises(upstream.InvalidResponse, match="interim answers"):
            await exchange(pool, origin_of(peer), target=b"/interim-flood")
        await until(lambda: peer.ended == 1, "the client hung up")
        assert peer.flooded < FLOOD_BYTES
        pool.close()


async def test_interim_answers_up_to_the_limit_are_skipped() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
    final = answer(b"final", b"connection: close")  # as the raw mode closes after it
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        peer.raw = [interim * upstream.MAX_INTERIM + final]
        assert await exchange(pool, origin_of(peer), target=b"/raw") == b"final"
        peer.raw = [interim * (upstream.MAX_INTERIM + 1) + final]
        with pytest.raises(upstream.InvalidResponse, match="interim"):
            await exchange(pool, origin_of(peer), target=b"/raw")
        pool.close()


@pytest.mark.parametrize("mode", ["trailing-bytes", "late-trailing-bytes"])
async def test_bytes_after_a_complete_answer_are_not_part_of_it_and_end_its_connection(mode: str) -> None:
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        response = await pool.request("GET", origin_of(peer), b"/" + mode.encode(), [], b"", 5)
        # The second head arrives while the first answer is still held.
        await until(lambda: peer.trailing_sent == 1, "the second head sent")
        await asyncio.sleep(0.05)
        assert response.header_values(b"content-length") == [str(len(OK_BODY))]
        assert await read_all(response) == OK_BODY
        response.close()
        assert pool.idle_count(origin_of(peer)) == 0
        assert await exchange(pool, origin_of(peer), target=b"/ok") == OK_BODY
        assert peer.connections == 2  # the second request did not go to the spoilt connection
        pool.close()


@pytest.mark.parametrize("mode", ["cut-chunked", "cut-event-stream", "short-length"])
async def test_a_body_cut_short_is_an_error_for_the_reader_never_its_end(mode: str) -> None:
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        response = await pool.request("GET", origin_of(peer), b"/" + mode.encode(), [], b"", 5)
        assert response.status == 200
        got = b""
        with pytest.raises(upstream.Disconnected, match="closed the connection"):
            while chunk := await response.read(5):
                got += chunk
        response.close()
        assert got.startswith((b"data: ", b'{"part"'))
        pool.close()


async def open_at_once(pool: upstream.Pool, peer: HostileUpstream, count: int) -> None:
    """`count` requests in flight together, so each has a connection of its own, then all answered."""
    requests = [asyncio.create_task(exchange(pool, origin_of(peer), target=b"/gated")) for _ in range(count)]
    await until(lambda: peer.connections == count, f"{count} connections open")
    peer.gate.set()
    assert await asyncio.gather(*requests) == [OK_BODY] * count


async def test_idle_connections_per_origin_are_capped_and_the_rest_closed() -> None:
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        await open_at_once(pool, peer, upstream.MAX_IDLE_PER_ORIGIN + 50)
        assert pool.idle_count(origin_of(peer)) == upstream.MAX_IDLE_PER_ORIGIN
        await until(lambda: peer.ended == 50, "the 50 connections past the cap closed")
        pool.close()


async def test_a_thousand_stale_idle_connections_are_skipped_without_recursion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past the default cap on purpose: what is tested is walking a long idle list.
    monkeypatch.setattr(upstream, "MAX_IDLE_PER_ORIGIN", 2000)
    async with HostileUpstream() as peer:
        pool = upstream.Pool(5)
        await open_at_once(pool, peer, 1200)
        assert pool.idle_count(origin_of(peer)) == 1200
        monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.05)
        await asyncio.sleep(0.1)
        assert await exchange(pool, origin_of(peer), target=b"/ok") == OK_BODY
        assert pool.idle_count(origin_of(peer)) == 1
        pool.close()


# -- Properties of the response parser, against bytes a raw server writes.

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
FRAMING_NAMES = {"content-length", "transfer-encoding", "connection", "proxy-connection", "upgrade"}
header_names = st.text(TOKEN, min_size=1, max_size=20).filter(lambda n: n.lower() not in FRAMING_NAMES)
# Neither empty nor with surrounding whitespace: llhttp trims that, and httptools drops empty values.
header_values = st.text(string.printable[:95], min_size=1, max_size=60).map(str.strip).filter(bool)
# Pieces of real answers, so that random bytes also reach the parser's later states.
HTTP_FRAGMENTS = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"transfer-encoding: chunked\r\n",
    b"content-length: 5\r\n", b"\r\n", b"5\r\nhello\r\n", b"0\r\n\r\n", b"x: y\r\n",
]  # fmt: skip


def split(message: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(message), *(c % (len(message) + 1) for c in cuts)})
    return [message[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.one_of(st.binary(max_size=200), st.sampled_from(HTTP_FRAGMENTS)), max_size=12),
)
async def test_any_bytes_from_upstream_end_in_an_answer_or_an_upstream_error(pieces: list[bytes]) -> None:
    # An exception inside the protocol's callbacks would not reach the caller:
    # the loop reports it to its handler and drops the connection.
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        async with HostileUpstream() as peer:
            peer.raw = pieces
            pool = upstream.Pool(5)
            with contextlib.suppress(upstream.UpstreamError, TimeoutError):
                await exchange(pool, origin_of(peer), target=b"/raw", timeout=2)
            pool.close()
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == []


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    headers=st.lists(st.tuples(header_names, header_values), max_size=8),
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked", "close"]),
    data=st.data(),
)
async def test_well_formed_answers_arrive_exactly(
    status: int, headers: list[tuple[str, str]], body: bytes, framing: str, data: st.DataObject
) -> None:
    raw_headers = [(n.encode(), v.encode()) for n, v in headers]
    if framing == "length":
        raw_headers.append((b"content-length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        raw_headers.append((b"transfer-encoding", b"chunked"))
        parts = split(body, data.draw(st.lists(st.integers(0, 3000), max_size=6))) if body else []
        payload = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        payload = body
    head = b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(b"%b: %b\r\n" % h for h in raw_headers)
    message = head + b"\r\n" + payload
    async with HostileUpstream() as peer:
        peer.raw = split(message, data.draw(st.lists(st.integers(0, len(message)), max_size=6)))
        pool = upstream.Pool(5)
        response = await pool.request("GET", origin_of(peer), b"/raw", [], b"", 5)
        try:
            assert response.status == status
            assert response.headers == [(n.lower(), v) for n, v in raw_headers]
            assert await read_all(response) == body
        finally:
            response.close()
            pool.close()
