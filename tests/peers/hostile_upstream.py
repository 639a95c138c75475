"""Test peer: a raw HTTP/1.1 server on 127.0.0.1 that misbehaves as the request path says.

Run in the test's own event loop (`async with HostileUpstream() as peer`), it is
met either directly by `proxy.upstream.Pool` or through a real proxy process
whose server url is `peer.url(mode)`. It answers every request on a connection
in turn, so a client that wrongly reuses a connection is seen in `connections`.

Modes (the request path, without its slash):
    ok                    a well-formed JSON answer; the connection is kept
    gated                 the same, once `gate` is set (to hold many connections open at once)
    endless-headers       a status line, then header lines until FLOOD_BYTES are sent
    endless-header-value  a status line, then one header whose value never ends
    interim-flood         `100 Continue` answers until FLOOD_BYTES are sent
    trailing-bytes        a complete answer and, in the same write, the head of a second
                          one with a conflicting Content-Length; the connection is kept
    late-trailing-bytes   the same, the second head 0.1 s after the first answer
    cut-chunked           a chunked JSON body that stops mid-chunk; the connection is closed
    cut-event-stream      the same for a chunked text/event-stream
    short-length          10 of the 100 bytes the Content-Length announces, then a close
    raw                   the pieces in `raw`, one write each, then a close
    slow-ok               SLOW_BODY, after 0.3 s; the connection is kept
    split                 a JSON answer's head, then its body 0.2 s later; the connection is kept
    chunked               a whole chunked JSON answer in two chunks, 0.1 s apart; the connection is kept
    silent                no answer at all, until the client hangs up
    big                   a JSON answer of BIG_BYTES; the connection is kept
    refuse                401 with a Bearer challenge; the connection is kept
    collector             an empty 200, as an OTLP collector answers an export
"""

from __future__ import annotations

import asyncio
import contextlib

FLOOD_BYTES = 64 * 1024 * 1024
# The second answer's head that the trailing-bytes modes send after the first one.
TRAILING_HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 999\r\n\r\n"
OK_BODY = b'{"ok":true}'
SLOW_BODY = b'{"slow":true}'
BIG_BYTES = 200 * 1024
JSON = b"content-type: application/json"


class HostileUpstream:
    def __init__(self) -> None:
        self.connections = 0
        self.ended = 0  # connections closed, by either side
        # How many bytes the flooding modes got out before the client hung up.
        self.flooded = 0
        self.trailing_sent = 0  # second heads sent by the trailing-bytes modes
        self.gate = asyncio.Event()
        self.raw: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"

    async def __aenter__(self) -> HostileUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            try:
                while True:
                    head, _ = await read_request(reader)
                    mode = head.split(b" ", 2)[1].lstrip(b"/").decode()
                    if not await self._answer(mode, reader, writer):
                        break
            finally:
                writer.close()
                self.ended += 1

    async def _answer(self, mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write the answer for `mode`; whether to keep the connection for another request."""
        if mode == "gated":
            await self.gate.wait()
        if mode in ("ok", "gated"):
            writer.write(answer(OK_BODY, JSON))
        elif mode == "endless-headers":
            await self._flood(writer, b"HTTP/1.1 200 OK\r\n", b"x-filler: " + b"f" * 1000 + b"\r\n")
            await reader.read()  # until the client hangs up
        elif mode == "endless-header-value":
            await self._flood(writer, b"HTTP/1.1 200 OK\r\nx-endless: ", b"v" * 4096)
            await reader.read()
        elif mode == "interim-flood":
            await self._flood(writer, b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 40)
            await reader.read()
        elif mode == "trailing-bytes":
            writer.write(answer(OK_BODY, JSON) + TRAILING_HEAD)
            self.trailing_sent += 1
        elif mode == "late-trailing-bytes":
            writer.write(answer(OK_BODY, JSON))
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(TRAILING_HEAD)
            self.trailing_sent += 1
        elif mode in ("cut-chunked", "cut-event-stream"):
            kind = b"application/json" if mode == "cut-chunked" else b"text/event-stream"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ntransfer-encoding: chunked\r\n\r\n" % kind)
            writer.write(b'10\r\ndata: {"part":1}\r\n')  # a whole chunk (16 bytes)
            writer.write(b"20\r\ndata: only ha")  # 12 of the 32 bytes this chunk announces
            await writer.drain()
            return False
        elif mode == "short-length":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
            writer.write(b'{"part":1,')
            await writer.drain()
            return False
        elif mode == "raw":
            for piece in self.raw:
                writer.write(piece)
                await writer.drain()
            return False
        elif mode == "slow-ok":
            await asyncio.sleep(0.3)
            writer.write(answer(SLOW_BODY, JSON))
        elif mode == "split":
            whole = answer(OK_BODY, JSON)
            writer.write(whole[: -len(OK_BODY)])
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(OK_BODY)
        elif mode == "chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            writer.write(b'6\r\n{"ok":\r\n')
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"5\r\ntrue}\r\n0\r\n\r\n")
        elif mode == "silent":
            await reader.read()
            return False
        elif mode == "big":
            writer.write(answer(b'{"pad":"' + b"p" * (BIG_BYTES - 10) + b'"}', JSON))
        elif mode == "refuse":
            writer.write(
                answer(
                    b"{}", JSON, b'www-authenticate: Bearer error="invalid_token"', status=b"401 Unauthorized"
                )
            )
        elif mode == "collector":
            writer.write(answer(b""))
        else:
            writer.write(answer(b"unknown mode", status=b"404 Not Found"))
        await writer.drain()
        return True

    async def _flood(self, writer: asyncio.StreamWriter, first: bytes, piece: bytes) -> None:
        writer.write(first)
        self.flooded = len(first)
        while self.flooded < FLOOD_BYTES:
            writer.write(piece)
            self.flooded += len(piece)
            await writer.drain()


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
