"""Test peer: a real MCP server (official Python SDK) for Keybearer's proxy tests.

Run as a subprocess (see ``tests/peers/mcp_client.py::run_upstream``)::

    python tests/peers/mcp_upstream.py --transport streamable-http [--json-response] [--stateless] --port 0
    python tests/peers/mcp_upstream.py --transport sse --port 0

Once listening it prints exactly one line ``READY <port>`` to stdout (``--port 0``
binds a free port chosen by the OS, so there is no race on port allocation).
``--exit-on-stdin-eof`` (used by ``run_upstream``) makes it exit when its parent dies.

Mount paths (SDK defaults):
    streamable-http  ->  ``/mcp`` (POST / GET standalone stream / DELETE)
    sse (legacy)     ->  ``GET /sse`` (event stream) + ``POST /messages/?session_id=<hex>``

MCP tools:
    ``echo(text)``      returns ``text``.
    ``headers()``       returns a JSON object of the HTTP request headers this server saw
                        (lower-cased names; repeated headers joined with ", ").
    ``notify(message, channel="standalone", delay=0.0, wait_for_stream=5.0)``
                        sends a ``notifications/message`` (logger ``"keybearer-test"``, level
                        ``info``, data ``message``) to the client. See "Notifications" below.

Plain-HTTP side routes (served by an ASGI wrapper in front of the SDK app, so they are not
subject to the SDK's Host/Origin checks):
    ``GET /_stats``     JSON counters, see ``Stats.snapshot``: ``open_connections`` (TCP
                        connections currently open, counted by a uvicorn protocol hook,
                        excluding the one carrying this /_stats request; idle keep-alive
                        connections of a pooling client/proxy count too),
                        ``open_requests`` (in-flight HTTP requests/streams), ``requests``
                        (total), ``disconnects`` (requests that ended because the client
                        went away), ``open_by_path``, ``get_streams`` (open standalone GET
                        streams on /mcp keyed by Mcp-Session-Id). ``/_stats`` itself is
                        never counted.
    ``GET /_slow?seconds=S``          sleeps S seconds then answers ``{"slept": S}`` (ends
                        early, and counts a disconnect, if the client goes away).
    ``GET /_sse_ticks?n=N&interval=I``  ``text/event-stream``: N events ``event: tick`` /
                        ``id: i`` / ``data: {"i": i}``, with a ``: ping`` comment line between
                        consecutive events (half an interval after each event). ``n=-1``
                        ticks until the client disconnects.
    ``ANY /_echo``      answers JSON ``{method, path, query, headers, body}`` describing the
                        request as received (for plain-HTTP forwarding tests).

Notifications (which stream they arrive on):
    The SDK's ``ServerSession`` routes a server->client message by ``related_request_id``:
    with one, it rides the response stream of that request (the POST's SSE response); without
    one, it goes to the connection's standalone channel, which for streamable HTTP is the
    standalone ``GET /mcp`` SSE stream (the client SDK opens it right after sending
    ``notifications/initialized``). ``ctx.log()`` always sets ``related_request_id``, so
    ``notify`` calls ``ctx.session.send_log_message(..., related_request_id=None)`` instead.

    * ``channel="standalone"`` (default): sent with no related request -> GET stream.
      Without an event store the SDK silently drops standalone messages while no GET
      stream is open, and the client opens it asynchronously after the handshake, so
      ``notify`` first waits (up to ``wait_for_stream`` s) until this process has seen a
      ``GET /mcp`` answered 200 for the caller's Mcp-Session-Id (tracked by the ASGI
      wrapper). With ``delay > 0`` it is sent from a background task ``delay`` seconds after
      the tool has returned, i.e. truly unrelated to any in-flight request.
    * ``channel="request"``: sent with ``related_request_id`` -> on the tools/call POST's SSE
      response. In ``--json-response`` mode the SDK drops it (a JSON body has no room).
    * Legacy sse transport: everything arrives on the single ``GET /sse`` stream.
    * Stateless mode has no session and no GET stream: only ``channel="request"`` works.
    * Protocol 2026-07-28 (client ``mode="auto"`` against this server negotiates it: no
      ``initialize``, no Mcp-Session-Id, no GET stream): no standalone channel, and
      request-scoped logs are only sent if the client opted in (``ClientSession(log_level=)``).

    The tool's text result says what happened: ``"sent on standalone stream"`` (GET stream),
    ``"sent on sse stream"`` (legacy), ``"sent on request stream"``, ``"scheduled in 0.5s"``,
    ``"no GET stream seen; sent anyway ..."``, or ``"... not sent"`` (stateless / 2026-07-28).

Host/Origin: for 127.0.0.1 the SDK enables DNS-rebinding protection with
``allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"]`` (other Host -> 421 "Invalid Host
header"; a foreign Origin -> 403). ``--allowed-host`` (repeatable, ``host:port`` or ``host:*``)
adds hosts to that list (``host:*`` only matches a Host *with* a port: pass ``host`` too for
the bare form) and ``--no-host-check`` disables the protection entirely, for tests where the
proxy forwards the client's Host unchanged. Note the checks run after the session lookup: a
request with an unknown Mcp-Session-Id gets 404 even with a foreign Host.

Trailing slashes: ``POST /mcp/`` and ``POST /messages?...`` get Starlette's 307 redirect to
``/mcp`` / ``/messages/?...``, with an absolute Location built from the request's Host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

NOTIFY_LOGGER = "keybearer-test"
MCP_PATH = "/mcp"
SSE_PATH = "/sse"
MESSAGE_PATH = "/messages/"


# --------------------------------------------------------------------------- counters


@dataclass
class Stats:
    """Process-wide counters exposed on ``GET /_stats``."""

    open_connections: int = 0
    open_requests: int = 0
    requests: int = 0
    disconnects: int = 0
    open_by_path: Counter[str] = field(default_factory=Counter)
    # Mcp-Session-Id -> number of open standalone GET streams answered 200.
    get_streams: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            # Minus the connection carrying the /_stats request itself.
            "open_connections": self.open_connections - 1,
            "open_requests": self.open_requests,
            "requests": self.requests,
            "disconnects": self.disconnects,
            "open_by_path": {k: v for k, v in self.open_by_path.items() if v},
            "get_streams": {k: v for k, v in self.get_streams.items() if v},
        }


STATS = Stats()


class CountingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, counting open TCP connections.

    Passed as ``uvicorn.Config(http=...)``; h11 (pure Python) rather than httptools so the
    behaviour does not depend on which optional C parser is installed.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        STATS.open_connections += 1
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        STATS.open_connections -= 1
        super().connection_lost(exc)


# --------------------------------------------------------------------------- side routes


def _json_response(payload: Any, status: int = 200) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(payload).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body}


def _query(scope: Scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}


def _headers_dict(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in raw:
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


class _ClientGone(Exception):
    pass


async def _wait_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (drains any request body first)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _race_disconnect(coro: Any, receive: Receive) -> None:
    """Run ``coro``; raise ``_ClientGone`` (and cancel it) if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone in done and work not in done:
            raise _ClientGone
        work.result()
    finally:
        for task in (work, gone):
            task.cancel()


async def _slow(scope: Scope, receive: Receive, send: Send) -> None:
    seconds = float(_query(scope).get("seconds", "1"))
    await _race_disconnect(asyncio.sleep(seconds), receive)
    start, body = _json_response({"slept": seconds})
    await send(start)
    await send(body)


async def _sse_ticks(scope: Scope, receive: Receive, send: Send) -> None:
    q = _query(scope)
    n, interval = int(q.get("n", "3")), float(q.get("interval", "0.2"))

    async def emit() -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        # An initial comment flushes the headers through buffering intermediaries.
        await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
        i = 0
        while n < 0 or i < n:
            event = f'id: {i}\nevent: tick\ndata: {{"i": {i}}}\n\n'.encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            i += 1
            if n >= 0 and i == n:
                break
            await asyncio.sleep(interval / 2)
            await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
            await asyncio.sleep(interval / 2)
        await send({"type": "http.response.body", "body": b""})

    await _race_disconnect(emit(), receive)


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    start, resp = _json_response(
        {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode(),
            "headers": _headers_dict(scope["headers"]),
            "body": body.decode("utf-8", "replace"),
        }
    )
    await send(start)
    await send(resp)


SIDE_ROUTES = {"/_slow": _slow, "/_sse_ticks": _sse_ticks, "/_echo": _echo}


class TestPeerApp:
    """ASGI wrapper: serves the side routes and counts every other HTTP request.

    Lifespan (needed by the SDK's streamable-HTTP session manager) and anything not listed
    above pass through to the SDK app unchanged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/_stats":
            start, body = _json_response(STATS.snapshot())
            await send(start)
            await send(body)
            return

        STATS.requests += 1
        STATS.open_requests += 1
        STATS.open_by_path[path] += 1
        get_stream_key: str | None = None
        session_id = _headers_dict(scope["headers"]).get("mcp-session-id")

        async def tracking_send(message: Message) -> None:
            nonlocal get_stream_key
            # A 200 answer to GET /mcp is the standalone SSE stream of that session.
            if (
                message["type"] == "http.response.start"
                and message["status"] == 200
                and scope["method"] == "GET"
                and path.rstrip("/") == MCP_PATH
                and session_id
            ):
                get_stream_key = session_id
                STATS.get_streams[session_id] += 1
            await send(message)

        try:
            handler = SIDE_ROUTES.get(path)
            if handler is not None:
                await handler(scope, receive, tracking_send)
            else:
                await self.app(scope, receive, tracking_send)
        except _ClientGone:
            STATS.disconnects += 1
        finally:
            STATS.open_requests -= 1
            STATS.open_by_path[path] -= 1
            if get_stream_key is not None:
                STATS.get_streams[get_stream_key] -= 1


# --------------------------------------------------------------------------- MCP server

mcp_server = MCPServer("keybearer-test-upstream")
_background: set[asyncio.Task[None]] = set()  # keep references to fire-and-forget tasks


@mcp_server.tool()
def echo(text: str) -> str:
    """Return ``text`` unchanged."""
    return text


@mcp_server.tool()
def headers(ctx: Context) -> str:
    """JSON object of the HTTP request headers of the request carrying this tools/call."""
    raw = ctx.headers
    if raw is None:
        return "{}"
    out: dict[str, str] = {}
    # starlette Headers.items() yields repeated headers separately; keep them all.
    for name, value in raw.items():
        name = name.lower()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return json.dumps(out)


async def _send_log(ctx: Context, message: str, related_request_id: str | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # logging is deprecated as of protocol 2026-07-28
        await ctx.session.send_log_message(
            level="info", data=message, logger=NOTIFY_LOGGER, related_request_id=related_request_id
        )


async def _wait_for_get_stream(session_id: str | None, timeout: float) -> bool:
    if not session_id:
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if STATS.get_streams[session_id] > 0:
            # The response has started; give the SDK a beat to register the stream's queue
            # (registration and header sending run concurrently inside sse-starlette).
            await asyncio.sleep(0.05)
            return True
        await asyncio.sleep(0.02)
    return False


@mcp_server.tool()
async def notify(
    message: str,
    ctx: Context,
    channel: Literal["standalone", "request"] = "standalone",
    delay: float = 0.0,
    wait_for_stream: float = 5.0,
) -> str:
    """Send ``notifications/message`` (logger keybearer-test) to the client. See module doc."""
    if channel == "request":
        await _send_log(ctx, message, ctx.request_id)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return "sent on request stream (dropped unless the client opted in via log_level)"
        return "sent on request stream"

    # Protocol 2026-07-28 (client mode="auto"/pinned) has no standalone channel at all.
    # (`_connection` is private SDK API; only used to give a truthful answer.)
    connection = getattr(ctx.session, "_connection", None)
    if not getattr(connection, "has_standalone_channel", True):
        return f"no standalone channel at protocol {ctx.protocol_version}; not sent"
    request = getattr(ctx.request_context, "request", None)
    legacy_sse = request is not None and request.url.path.startswith(MESSAGE_PATH)
    session_id = (ctx.headers or {}).get("mcp-session-id")
    if not legacy_sse and session_id is None:
        return "stateless streamable HTTP: no session, no GET stream; not sent"

    async def send_standalone() -> str:
        seen = True if legacy_sse else await _wait_for_get_stream(session_id, wait_for_stream)
        try:
            await _send_log(ctx, message, None)
        except Exception as exc:
            return f"failed: {type(exc).__name__}: {exc}"
        if legacy_sse:
            return "sent on sse stream"
        return "sent on standalone stream" if seen else "no GET stream seen; sent anyway (SDK drops it)"

    if delay > 0:

        async def later() -> None:
            await asyncio.sleep(delay)
            result = await send_standalone()
            print(f"notify(delay={delay}): {result}", file=sys.stderr, flush=True)

        task = asyncio.get_running_loop().create_task(later())
        _background.add(task)
        task.add_done_callback(_background.discard)
        return f"scheduled in {delay}s"
    return await send_standalone()


# --------------------------------------------------------------------------- main


def build_app(args: argparse.Namespace) -> ASGIApp:
    security: TransportSecuritySettings | None = None
    if args.no_host_check:
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    elif args.allowed_host:
        # Same defaults the SDK applies for 127.0.0.1, plus the extra hosts.
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", *args.allowed_host],
            allowed_origins=[
                "http://127.0.0.1:*",
                "http://localhost:*",
                "http://[::1]:*",
                *args.allowed_origin,
            ],
        )
    if args.transport == "sse":
        app = mcp_server.sse_app(
            sse_path=SSE_PATH, message_path=MESSAGE_PATH, transport_security=security, host=args.host
        )
    else:
        app = mcp_server.streamable_http_app(
            streamable_http_path=MCP_PATH,
            json_response=args.json_response,
            stateless_http=args.stateless,
            session_idle_timeout=args.session_idle_timeout,
            transport_security=security,
            host=args.host,
        )
    return TestPeerApp(app)


async def serve(args: argparse.Namespace) -> None:
    # MCPServer() configured the root logger at INFO (to stderr); quieten it.
    logging.getLogger().setLevel(args.log_level.upper())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(args),
        http=CountingH11Protocol,
        lifespan="on",
        log_level=args.log_level,
        # Open SSE streams would otherwise hold shutdown forever.
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # startup failed: surface the error
            raise SystemExit("uvicorn exited during startup")
        await asyncio.sleep(0.01)
    print(f"READY {port}", flush=True)
    if args.exit_on_stdin_eof:
        # The parent holds our stdin pipe: EOF means it died (even by SIGKILL), so do not
        # linger as an orphan holding a port.
        loop = asyncio.get_running_loop()

        def watch_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(setattr, server, "should_exit", True)

        threading.Thread(target=watch_stdin, daemon=True).start()
    await task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    p.add_argument(
        "--json-response", action="store_true", help="streamable-http: answer POSTs with JSON, not SSE"
    )
    p.add_argument(
        "--stateless", action="store_true", help="streamable-http: no sessions (stateless_http=True)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (reported on the READY line)")
    p.add_argument("--session-idle-timeout", type=float, default=None, help="seconds; default: never expire")
    p.add_argument(
        "--allowed-host", action="append", default=[], help="extra allowed Host (host:port or host:*)"
    )
    p.add_argument(
        "--allowed-origin", action="append", default=[], help="extra allowed Origin (with --allowed-host)"
    )
    p.add_argument("--no-host-check", action="store_true", help="disable the SDK's DNS-rebinding protection")
    p.add_argument("--log-level", default="warning")
    p.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="shut down when stdin closes (parent died)"
    )
    args = p.parse_args(argv)
    if args.transport == "sse" and (args.json_response or args.stateless):
        p.error("--json-response/--stateless only apply to --transport streamable-http")
    return args


if __name__ == "__main__":
    asyncio.run(serve(parse_args()))
