#!/usr/bin/env python3
"""The processes `tests/bench/run.py` starts besides the proxy, one role each.

    upstream   raw ASGI on one uvicorn worker (uvloop + httptools):
                 POST /mcp       a ~300-byte JSON-RPC result
                 GET  /ticks     an event stream, one stamped event every `?ms=` milliseconds
                 GET  /idle      an event stream that sends one comment, then nothing
    floor      the bare aiohttp pass-through: aiohttp.web server + one aiohttp ClientSession,
               uvloop, a fixed Authorization header; reads the body, forwards, answers
    asgi-floor the same as a raw ASGI app on uvicorn (httptools, uvloop), the answer streamed
               back chunk by chunk: the floor of Keybearer's own serving stack
    protocol-floor  the least a Python proxy can do: asyncio protocols on uvloop and httptools
               on both sides, no ASGI, no coroutine per request; the floor for the nginx row
    oauth      an OAuth-protected MCP server and its authorization server in one aiohttp app:
               401 + resource_metadata for requests without a token it issued, RFC 9728 and
               RFC 8414 metadata, a token endpoint that counts refreshes and rotates refresh
               tokens (a second use of one is `invalid_grant` and counted as reuse), /stats
    otlp       an OTLP/HTTP trace receiver: POST /v1/traces accepted and counted, GET /stats
    sse        client: opens N event streams, prints the delay of every stamped event (JSON)
    idle       client: opens N event streams, prints when they are open, holds them until its
               standard input closes
    burst      client: N concurrent POSTs spread over several proxies, on pre-opened connections

Every event is stamped with time.time_ns() by the upstream and compared with time.time_ns()
when it reaches the client: both run on this machine, so the clocks are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_choice import REQUEST_BODY, RESPONSE_BODY, serve
from client_choice import upstream_app as post_upstream_app

HOST = "127.0.0.1"
FLOOR_TOKEN = "bench-floor-token"
# A JSON-RPC notification like the ones MCP servers stream; "t" is the stamp.
EVENT_TEMPLATE = (
    'id: {n}\nevent: message\ndata: {{"jsonrpc":"2.0","method":"notifications/progress",'
    '"params":{{"progressToken":"bench","progress":{n},"message":"tick","t":{t}}}}}\n\n'
)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------- upstream

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


async def upstream_app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    """client_choice's upstream (POST /mcp), plus the event streams /ticks and /idle."""
    if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in ("/ticks", "/idle"):
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        interval = float(query.get("ms", "20")) / 1000 if scope["path"] == "/ticks" else None
        return await _event_stream(receive, send, interval)
    await post_upstream_app(scope, receive, send)


async def _event_stream(receive: ASGIReceive, send: ASGISend, interval: float | None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        if interval is None:
            await gone.wait()
            return
        n = 0
        while not gone.is_set():
            await asyncio.sleep(interval)
            n += 1
            event = EVENT_TEMPLATE.format(n=n, t=time.time_ns()).encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
    finally:
        watcher.cancel()


# --------------------------------------------------------------------------- aiohttp floor


def run_floor(port: int, upstream: str) -> None:
    import uvloop
    from aiohttp import ClientSession, TCPConnector, web

    async def startup(app: web.Application) -> None:
        app["session"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)

    async def cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            "Accept": request.headers.get("Accept", "application/json"),
            "Authorization": f"Bearer {FLOOR_TOKEN}",
        }
        async with request.app["session"].request(request.method, upstream, data=body, headers=headers) as up:
            payload = await up.read()
            return web.Response(
                body=payload,
                status=up.status,
                headers={"Content-Type": up.headers.get("Content-Type", "application/json")},
            )

    app = web.Application()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_route("*", "/{tail:.*}", forward)
    uvloop.install()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, backlog=2048)


def asgi_floor_app(upstream: str) -> Any:
    """The same pass-through as a raw ASGI app, served like Keybearer (uvicorn, httptools, uvloop):
    the floor of Keybearer's own architecture. Streams the answer back chunk by chunk."""
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
                    )
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if session is not None:
                        await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert session is not None
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        incoming = dict(scope["headers"])
        headers = {
            "Content-Type": incoming.get(b"content-type", b"application/json").decode(),
            "Accept": incoming.get(b"accept", b"application/json").decode(),
            "Authorization": f"Bearer {FLOOR_TOKEN}",
        }
        async with session.request(scope["method"], upstream, data=b"".join(chunks), headers=headers) as up:
            await send(
                {
                    "type": "http.response.start",
                    "status": up.status,
                    "headers": [
                        (b"content-type", up.headers.get("Content-Type", "application/json").encode())
                    ],
                }
            )
            while chunk := await up.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def run_protocol_floor(port: int, upstream: str) -> None:
    """The least a Python proxy can do per request: asyncio protocols on uvloop on both
    sides, httptools parsing both, no ASGI and no coroutine per request. It forwards
    the body with a fixed Authorization header and answers with the upstream's status,
    Content-Type and body. Bodies with Content-Length only: what wrk and the upstream send."""
    from urllib.parse import urlsplit

    import httptools
    import uvloop

    target = urlsplit(upstream)
    up_host, up_port, up_path = target.hostname or HOST, target.port or 80, target.path or "/"
    idle: list[Upstream] = []
    connecting: set[asyncio.Task[None]] = set()

    class Upstream(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.client: Downstream | None = None
            self.content_type = b"application/json"
            self.body: list[bytes] = []
            self.name = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def send(self, client: Downstream, head: bytes, body: bytes) -> None:
            self.client, self.body = client, []
            self.transport.write(head + body)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"content-type":
                self.content_type = value

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            client, self.client = self.client, None
            idle.append(self)
            if client is not None:
                client.answer(self.parser.get_status_code(), self.content_type, b"".join(self.body))

        def connection_lost(self, exc: Exception | None) -> None:
            if self in idle:
                idle.remove(self)

    class Downstream(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.headers: list[bytes] = []
            self.body: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.headers, self.body = [], []

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() in (b"content-type", b"accept"):
                self.headers.append(name + b": " + value)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            body = b"".join(self.body)
            head = b"\r\n".join(
                [
                    self.parser.get_method() + b" " + up_path.encode() + b" HTTP/1.1",
                    b"Host: " + f"{up_host}:{up_port}".encode(),
                    *self.headers,
                    b"Authorization: Bearer " + FLOOR_TOKEN.encode(),
                    b"Content-Length: " + str(len(body)).encode(),
                    b"",
                    b"",
                ]
            )
            if idle:
                idle.pop().send(self, head, body)
            else:
                task = asyncio.ensure_future(self.connect(head, body))
                connecting.add(task)
                task.add_done_callback(connecting.discard)

        async def connect(self, head: bytes, body: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(Upstream, up_host, up_port)
            conn.send(self, head, body)

        def answer(self, status: int, content_type: bytes, body: bytes) -> None:
            self.transport.write(
                b"HTTP/1.1 " + str(status).encode() + b" OK\r\nContent-Type: " + content_type
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )  # fmt: skip

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Downstream, HOST, port, backlog=2048)
        await server.serve_forever()

    uvloop.run(main())


# --------------------------------------------------------------------------- OAuth peer


def run_oauth_peer(port: int, token_delay: float, expires_in: int = 3600) -> None:
    import uvloop
    from aiohttp import web

    origin = f"http://{HOST}:{port}"
    prm_url = f"{origin}/.well-known/oauth-protected-resource/mcp"
    stats: Counter[str] = Counter()
    # A refresh token is "<grant>:<secret>"; each grant (a user's) rotates on its own, and
    # starts from "<grant>:seed", the token the benchmark stored.
    state: dict[str, Any] = {"refresh": {}, "valid": set(), "issued": 0}
    per_grant: Counter[str] = Counter()

    async def mcp(request: web.Request) -> web.Response:
        await request.read()
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is not None and token in state["valid"]:
            stats["mcp_ok"] += 1
            return web.Response(body=RESPONSE_BODY, content_type="application/json")
        stats["mcp_no_token" if token is None else "mcp_bad_token"] += 1
        challenge = f'Bearer resource_metadata="{prm_url}"'
        if token is not None:
            challenge = f'Bearer error="invalid_token", resource_metadata="{prm_url}"'
        return web.json_response(
            {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": challenge}
        )

    async def protected_resource(_: web.Request) -> web.Response:
        stats["prm"] += 1
        return web.json_response(
            {"resource": f"{origin}/mcp", "authorization_servers": [origin], "scopes_supported": ["mcp"]}
        )

    async def as_metadata(_: web.Request) -> web.Response:
        stats["as_metadata"] += 1
        return web.json_response(
            {
                "issuer": origin,
                "authorization_endpoint": f"{origin}/authorize",
                "token_endpoint": f"{origin}/token",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": ["mcp"],
            }
        )

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        stats["token_requests"] += 1
        if form.get("grant_type") != "refresh_token" or form.get("client_id") != "bench":
            stats["token_bad_request"] += 1
            return web.json_response({"error": "invalid_request"}, status=400)
        presented = str(form.get("refresh_token"))
        grant = presented.partition(":")[0]
        per_grant[grant] += 1
        if token_delay:
            await asyncio.sleep(token_delay)  # a real authorization server takes its time
        if presented != state["refresh"].get(grant, f"{grant}:seed"):
            stats["refresh_reused"] += 1  # a provider would now revoke the whole grant
            return web.json_response({"error": "invalid_grant"}, status=400)
        state["issued"] += 1
        n = state["issued"]
        access = f"at-{n}-{secrets.token_urlsafe(16)}"
        state["refresh"][grant] = f"{grant}:{n}-{secrets.token_urlsafe(16)}"
        state["valid"].add(access)
        stats["refreshes"] += 1
        return web.json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": expires_in,
                "refresh_token": state["refresh"][grant],
                "scope": "mcp",
            },
            headers={"Cache-Control": "no-store"},
        )

    async def get_stats(_: web.Request) -> web.Response:
        most = max(per_grant.values(), default=0)
        return web.json_response({**stats, "grants": len(per_grant), "most_per_grant": most})

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", protected_resource)
    app.router.add_get("/.well-known/oauth-protected-resource", protected_resource)
    app.router.add_get("/.well-known/oauth-authorization-server", as_metadata)
    app.router.add_post("/token", token)
    app.router.add_get("/stats", get_stats)
    uvloop.install()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, backlog=2048)


# --------------------------------------------------------------------------- OTLP receiver


def run_otlp_receiver(port: int) -> None:
    """Where the traced proxy exports its spans: each batch is accepted and counted, not decoded."""
    import uvloop
    from aiohttp import web

    stats: Counter[str] = Counter()

    async def traces(request: web.Request) -> web.Response:
        stats["exports"] += 1
        stats["bytes"] += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(dict(stats))

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    uvloop.install()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


# --------------------------------------------------------------------------- clients


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def sse_client(url: str, streams: int, seconds: float, skip: float) -> dict[str, Any]:
    """Delay of each stamped event from the upstream's send to this client's read, in ms."""
    import aiohttp

    delays: list[float] = []
    errors: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one() -> None:
            started = time.monotonic()
            try:
                async with session.get(url, headers={"Accept": "text/event-stream"}) as response:
                    if response.status != 200:
                        errors.append(f"HTTP {response.status}")
                        return
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        now = time.time_ns()
                        buffer += chunk
                        while (end := buffer.find(b"\n\n")) >= 0:
                            event, buffer = buffer[:end], buffer[end + 2 :]
                            mark = event.rfind(b'"t":')
                            if mark >= 0 and time.monotonic() - started >= skip:
                                stamp = int(event[mark + 4 :].split(b"}", 1)[0])
                                delays.append((now - stamp) / 1e6)
                        if time.monotonic() - started >= seconds:
                            return
            except (aiohttp.ClientError, OSError) as exc:
                errors.append(type(exc).__name__)

        await asyncio.gather(*(one() for _ in range(streams)))
    return {
        "events": len(delays),
        "p50_ms": _percentile(delays, 50),
        "p99_ms": _percentile(delays, 99),
        "max_ms": max(delays) if delays else None,
        "errors": errors[:5],
        "error_count": len(errors),
        "histogram_ms": _histogram(delays, (0.5, 1, 2, 3, 4, 5, 10)),
    }


def _histogram(values: list[float], edges: tuple[float, ...]) -> dict[str, int]:
    counts = Counter(next((f"<{e:g}" for e in edges if v < e), f">={edges[-1]:g}") for v in values)
    return {key: counts[key] for key in [*(f"<{e:g}" for e in edges), f">={edges[-1]:g}"] if counts[key]}


async def idle_client(url: str, streams: int, batch: int) -> None:
    """Open `streams` event streams, report, hold them until stdin closes, then close them."""
    import aiohttp

    raise_fd_limit()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
    responses: list[aiohttp.ClientResponse] = []
    errors: Counter[str] = Counter()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)

    async def open_one() -> None:
        try:
            response = await session.get(url, headers={"Accept": "text/event-stream"})
            if response.status != 200:
                errors[f"HTTP {response.status}"] += 1
                response.close()
                return
            await response.content.readany()  # the upstream's first comment: open end to end
            responses.append(response)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1

    started = time.monotonic()
    for first in range(0, streams, batch):
        await asyncio.gather(*(open_one() for _ in range(min(batch, streams - first))))
    report = {
        "opened": len(responses),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "seconds": time.monotonic() - started,
    }
    print(json.dumps(report), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for response in responses:
        response.close()
    await session.close()


async def burst_client(
    bases: list[str], path: str, n: int, repeat: int, pause: float, users: int = 1
) -> dict[str, Any]:
    """`n` concurrent POSTs spread over `bases`, on connections opened beforehand; `repeat` bursts.
    `{user}` in `path` is u0, u1, … round-robin over `users`."""
    import aiohttp

    raise_fd_limit()
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=60)
    out: dict[str, Any] = {"bursts": []}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # One connection per request, opened and kept alive before the clock starts, so that
        # what is timed is the proxies' work and not 500 TCP handshakes.
        async def ping(base: str) -> None:
            async with session.get(base + "/ping") as response:
                await response.read()

        await asyncio.gather(*(ping(bases[i % len(bases)]) for i in range(n)))
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        for _ in range(repeat):
            started = time.perf_counter()
            refusals: Counter[str] = Counter()

            async def post(
                i: int, started: float = started, refusals: Counter[str] = refusals
            ) -> tuple[int, bool, float]:
                try:
                    async with session.post(
                        bases[i % len(bases)] + path.format(user=f"u{i % users}"),
                        data=REQUEST_BODY,
                        headers=headers,
                    ) as response:
                        body = await response.read()
                        ok = body == RESPONSE_BODY
                        if not ok:
                            refusals[_refusal(body)] += 1
                        return response.status, ok, time.perf_counter() - started
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    refusals[type(exc).__name__] += 1
                    return 0, False, time.perf_counter() - started

            results = await asyncio.gather(*(post(i) for i in range(n)))
            done = [r[2] * 1000 for r in results]
            statuses = Counter(str(r[0]) for r in results)
            out["bursts"].append(
                {
                    "all_done_ms": max(done),
                    "p50_ms": _percentile(done, 50),
                    "p99_ms": _percentile(done, 99),
                    "statuses": dict(statuses),
                    "body_ok": sum(1 for r in results if r[1]),
                    "refusals": dict(refusals.most_common(5)),
                }
            )
            await asyncio.sleep(pause)
    return out


def _refusal(body: bytes) -> str:
    """What a proxy's error answer says (its code and message, numbers masked so that alike ones add up)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:80].decode(errors="replace")
    if isinstance(error, dict):
        error = f"{(error.get('data') or {}).get('error')}: {error.get('message')}"
    return re.sub(r"\d+(\.\d+)?", "N", str(error))[:200]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("upstream")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("floor")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p = sub.add_parser("asgi-floor")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p = sub.add_parser("protocol-floor")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p = sub.add_parser("oauth")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-delay-ms", type=float, default=50)
    p.add_argument("--expires-in", type=int, default=3600, help="lifetime of the access tokens it issues")
    p = sub.add_parser("otlp")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("sse")
    p.add_argument("--url", required=True)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--skip", type=float, default=0.5, help="seconds of events not counted at the start")
    p = sub.add_parser("idle")
    p.add_argument("--url", required=True)
    p.add_argument("--streams", type=int, default=5000)
    p.add_argument("--batch", type=int, default=250)
    p = sub.add_parser("burst")
    p.add_argument("--bases", nargs="+", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("-n", type=int, default=500)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--users", type=int, default=1, help="users u0… round-robin, for {user} in --path")
    args = parser.parse_args(argv)

    if args.role == "upstream":
        raise_fd_limit()
        serve(upstream_app, args.port)
    elif args.role == "floor":
        run_floor(args.port, args.upstream)
    elif args.role == "asgi-floor":
        serve(asgi_floor_app(args.upstream), args.port)
    elif args.role == "protocol-floor":
        run_protocol_floor(args.port, args.upstream)
    elif args.role == "oauth":
        run_oauth_peer(args.port, args.token_delay_ms / 1000, args.expires_in)
    elif args.role == "otlp":
        run_otlp_receiver(args.port)
    else:
        import uvloop

        if args.role == "sse":
            result = uvloop.run(sse_client(args.url, args.streams, args.seconds, args.skip))
            print(json.dumps(result), flush=True)
        elif args.role == "idle":
            uvloop.run(idle_client(args.url, args.streams, args.batch))
        elif args.role == "burst":
            result = uvloop.run(
                burst_client(args.bases, args.path, args.n, args.repeat, args.pause, args.users)
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
