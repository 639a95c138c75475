"""proxy/upstream.py, the forwarding path's HTTP/1.1 client, against raw servers on loopback.

Each server here writes its answer byte by byte as given, so that the framings a
real upstream may choose (lengths, chunks, close-delimited, HEAD, 1xx, TLS) and
its misbehaviour (garbage, early close, silence) are each met once.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
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


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head and its body (by Content-Length or chunks)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


def answer(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    lines = [b"HTTP/1.1 " + status, b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def exchange(pool: upstream.Pool, origin: upstream.Origin, body: bytes = b"{}", **kw: object) -> bytes:
    response = await pool.request(
        str(kw.get("method", "POST")),
        origin,
        b"/mcp",
        [(b"content-type", b"application/json")],
        body,
        float(kw.get("timeout", 5)),  # type: ignore[arg-type]
    )
    try:
        chunks = []
        while chunk := await response.read(5):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        response.close()


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
        assert await exchange(pool, server.origin, parts()) == b"500000"  # type: ignore[arg-type]
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
