#!/usr/bin/env python3
"""Choose Keybearer's forwarding HTTP client by measurement.

One run, on loopback only (127.0.0.1), with every server in its own process:

* a small fast upstream (raw ASGI app on uvicorn, uvloop + httptools) that answers
  ``POST /mcp`` with a ~300-byte JSON-RPC result;
* for each candidate client, a bare Starlette pass-through on ONE uvicorn worker
  (uvloop + httptools) pinned to CPU 0, which reads the POST body, forwards it to the
  upstream and streams the answer back;
* ``wrk`` pinned to CPU 1 (the upstream shares CPU 1), driving POSTs with a JSON body.

Candidates:
  aiohttp        aiohttp.ClientSession, one shared session, keep-alive pool, auto_decompress=False
  httpx+aiohttp  httpx.AsyncClient over httpx_aiohttp.AiohttpTransport (PyPI: httpx-aiohttp)
  httpx          httpx.AsyncClient with its own pool (httpcore), limits sized for 128 connections
  httpx2         httpx2.AsyncClient with its own pool (extra: the fork the mcp SDK depends on)
  direct         no proxy, wrk straight to the upstream (reference; upstream + wrk share CPU 1)

Candidates whose library is not importable are skipped with a note.

Usage:
    .venv/bin/python tests/bench/client_choice.py                 # 1, 16, 64 clients
    .venv/bin/python tests/bench/client_choice.py -c 64 -d 8 -r 3 # 64 clients, 3 rounds

Needs ``wrk`` (Debian: ``apt-get install -y wrk``) and ``taskset`` (util-linux).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PROXY_CPU = "0"
LOAD_CPU = "1"  # wrk and the upstream
POOL_SIZE = 128  # connection pool size given to every candidate (>= 64 clients)

REQUEST_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hello from the benchmark"}},
    },
    separators=(",", ":"),
)


def _response_body() -> bytes:
    """A JSON-RPC result padded to about 300 bytes."""
    result: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "content": [{"type": "text", "text": ""}],
            "isError": False,
        },
    }
    base = len(json.dumps(result, separators=(",", ":")))
    result["result"]["content"][0]["text"] = "x" * max(0, 300 - base)
    return json.dumps(result, separators=(",", ":")).encode()


RESPONSE_BODY = _response_body()

CANDIDATES: dict[str, str] = {
    "aiohttp": "aiohttp ClientSession",
    "httpx+aiohttp": "httpx over httpx-aiohttp transport",
    "httpx": "httpx 0.28 own pool",
    "httpx2": "httpx2 own pool (extra)",
    "upstream": "Keybearer's own proxy/upstream.py (httptools)",
    "direct": "direct to upstream (no proxy)",
}
BASELINE = "aiohttp"

WRK_LUA = f"""
wrk.method = "POST"
wrk.body = {json.dumps(REQUEST_BODY)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d "
    .. "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --------------------------------------------------------------------------- upstream


async def upstream_app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Raw ASGI upstream: answers POST /mcp with RESPONSE_BODY."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    ok = scope["method"] == "POST" and scope["path"] == "/mcp"
    body = RESPONSE_BODY if ok else b'{"error":"not found"}'
    await send(
        {
            "type": "http.response.start",
            "status": 200 if ok else 404,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- proxies

# Request headers passed to the upstream and response headers passed back; the same for
# every candidate so that they do equal work.
FORWARD_REQUEST_HEADERS = ("content-type", "accept", "mcp-session-id", "mcp-protocol-version")
FORWARD_RESPONSE_HEADERS = ("content-type", "content-length", "mcp-session-id")


def _pick(headers: Any, names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


def build_proxy_app(client: str, upstream_url: str) -> Any:
    """A bare Starlette pass-through forwarding POST /mcp with the given client."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    Handler = Callable[[Request], Awaitable[Response]]

    @contextlib.asynccontextmanager
    async def aiohttp_lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=POOL_SIZE)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            yield {"session": session}

    async def aiohttp_forward(request: Request) -> Response:
        session = request.state.session
        body = await request.body()
        upstream = await session.post(
            upstream_url, data=body, headers=_pick(request.headers, FORWARD_REQUEST_HEADERS)
        )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        return StreamingResponse(
            relay(),
            status_code=upstream.status,
            headers=_pick(upstream.headers, FORWARD_RESPONSE_HEADERS),
        )

    def httpx_like_lifespan(
        make_client: Callable[[], Any],
    ) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[dict[str, Any]]]:
        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
            async with make_client() as http_client:
                yield {"client": http_client}

        return lifespan

    async def httpx_forward(request: Request) -> Response:
        http_client = request.state.client
        body = await request.body()
        outgoing = http_client.build_request(
            "POST",
            upstream_url,
            content=body,
            headers=_pick(request.headers, FORWARD_REQUEST_HEADERS),
        )
        upstream = await http_client.send(outgoing, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(
            relay(),
            status_code=upstream.status_code,
            headers=_pick(upstream.headers, FORWARD_RESPONSE_HEADERS),
        )

    def make_httpx_aiohttp() -> Any:
        import httpx
        from httpx_aiohttp import AiohttpTransport

        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        return httpx.AsyncClient(transport=AiohttpTransport(limits=limits))

    def make_httpx() -> Any:
        import httpx

        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        return httpx.AsyncClient(limits=limits)

    def make_httpx2() -> Any:
        import httpx2

        limits = httpx2.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        return httpx2.AsyncClient(limits=limits)

    @contextlib.asynccontextmanager
    async def upstream_lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        from proxy.upstream import Pool

        pool = Pool(connect_timeout=5)
        try:
            yield {"pool": pool}
        finally:
            pool.close()

    async def upstream_forward(request: Request) -> Response:
        from proxy.upstream import split_url

        origin, target = split_url(upstream_url)
        body = await request.body()
        headers = [
            (k.encode(), v.encode()) for k, v in _pick(request.headers, FORWARD_REQUEST_HEADERS).items()
        ]
        answer = await request.state.pool.request("POST", origin, target, headers, body, 30)

        async def relay() -> AsyncIterator[bytes]:
            try:
                while chunk := await answer.read(30):
                    yield chunk
            finally:
                answer.close()

        kept = {k.decode(): v.decode() for k, v in answer.headers if k.decode() in FORWARD_RESPONSE_HEADERS}
        return StreamingResponse(relay(), status_code=answer.status, headers=kept)

    choices: dict[str, tuple[Any, Handler]] = {
        "aiohttp": (aiohttp_lifespan, aiohttp_forward),
        "httpx+aiohttp": (httpx_like_lifespan(make_httpx_aiohttp), httpx_forward),
        "httpx": (httpx_like_lifespan(make_httpx), httpx_forward),
        "httpx2": (httpx_like_lifespan(make_httpx2), httpx_forward),
        "upstream": (upstream_lifespan, upstream_forward),
    }
    lifespan, handler = choices[client]
    return Starlette(routes=[Route("/mcp", handler, methods=["POST"])], lifespan=lifespan)


def candidate_available(candidate: str) -> str | None:
    """None if the candidate can run here, else the reason it cannot."""
    modules = {
        "aiohttp": ["aiohttp"],
        "httpx+aiohttp": ["httpx", "httpx_aiohttp"],
        "httpx": ["httpx"],
        "httpx2": ["httpx2"],
        "upstream": ["proxy.upstream", "httptools"],
        "direct": [],
    }[candidate]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"module {module!r} not installed"
    return None


def serve(app: Any, port: int) -> None:
    """Run an ASGI app on one uvicorn worker with uvloop + httptools (blocks)."""
    import uvicorn

    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        workers=1,
        backlog=2048,
    )


# --------------------------------------------------------------------------- harness


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def post_once(url: str, timeout: float = 2.0) -> bytes:
    request = urllib.request.Request(
        url,
        data=REQUEST_BODY.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait until url answers POSTs with the upstream's body, or fail."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            body = post_once(url)
        except OSError as exc:
            last_error = exc
            time.sleep(0.1)
            continue
        if body != RESPONSE_BODY:
            raise RuntimeError(f"{url} answered an unexpected body: {body[:80]!r}")
        return
    raise RuntimeError(f"{url} not ready after {timeout}s: {last_error}")


def start_server(role_args: list[str], cpu: str) -> subprocess.Popen[bytes]:
    command = ["taskset", "-c", cpu, sys.executable, str(Path(__file__).resolve()), *role_args]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    proxy_cpu: float | None  # share of one core used by the proxy, 0..1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        """Proxy CPU time per request: less sensitive to a noisy machine than req/s."""
        if self.proxy_cpu is None or not self.rps:
            return None
        return self.proxy_cpu * 1e6 / self.rps


def run_wrk(url: str, connections: int, seconds: int, lua: Path, proxy_pid: int | None) -> WrkResult:
    command = [
        "taskset", "-c", LOAD_CPU, "wrk",
        "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
        "--timeout", "10s", "-s", str(lua), url,
    ]  # fmt: skip
    cpu_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    wall_before = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - wall_before
    cpu = (cpu_seconds(proxy_pid) - cpu_before) / wall if proxy_pid else None
    match = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    values = {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}
    return WrkResult(
        requests=values["requests"],
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1e3,
        p99_ms=values["p99_us"] / 1e3,
        errors=sum(v for k, v in values.items() if k.startswith("err_")),
        proxy_cpu=cpu,
    )


def median_result(results: list[WrkResult]) -> WrkResult:
    """Median of each statistic over rounds (one round: that round)."""
    cpus = [r.proxy_cpu for r in results if r.proxy_cpu is not None]
    rps = statistics.median(r.rps for r in results)
    return WrkResult(
        requests=round(rps * 1000),
        seconds=1000.0,
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
        proxy_cpu=statistics.median(cpus) if cpus else None,
    )


def print_table(results: dict[tuple[str, int], WrkResult], candidates: list[str], levels: list[int]) -> None:
    header = (
        f"{'candidate':<15} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs aiohttp':>10} {'proxy cpu':>9} {'cpu us/req':>10} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        base = results.get((BASELINE, level))
        for candidate in candidates:
            result = results.get((candidate, level))
            if result is None:
                continue
            ratio = f"{result.rps / base.rps:.2f}" if base and base.rps else "-"
            cpu = f"{result.proxy_cpu:.0%}" if result.proxy_cpu is not None else "-"
            cost = result.cpu_us_per_request
            cost_text = f"{cost:.0f}" if cost is not None else "-"
            print(
                f"{candidate:<15} {level:>4} {result.rps:>9,.0f} {result.p50_ms:>8.2f} "
                f"{result.p99_ms:>8.2f} {ratio:>10} {cpu:>9} {cost_text:>10} {result.errors:>6}"
            )


def check_tools() -> None:
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"missing: {', '.join(missing)}. On Debian: apt-get install -y wrk (taskset is in util-linux)."
        )
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs at least 2 CPUs (proxy on CPU 0, wrk and upstream on CPU 1)")


def benchmark(args: argparse.Namespace) -> None:
    check_tools()
    candidates: list[str] = []
    for candidate in args.candidates:
        reason = candidate_available(candidate)
        if reason:
            print(f"skipping {candidate}: {reason}", file=sys.stderr)
        else:
            candidates.append(candidate)

    procs: list[subprocess.Popen[bytes]] = []
    results: dict[tuple[str, int], list[WrkResult]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="client-choice-") as tmp:
            lua = Path(tmp) / "post.lua"
            lua.write_text(WRK_LUA)

            upstream_port = free_port()
            upstream_url = f"http://{HOST}:{upstream_port}/mcp"
            upstream = start_server(["_upstream", "--port", str(upstream_port)], LOAD_CPU)
            procs.append(upstream)
            wait_ready(upstream_url, upstream)

            # All proxies run for the whole benchmark (idle ones cost nothing) so that
            # rounds can interleave candidates and spread the machine's noise evenly.
            targets: dict[str, tuple[str, int | None]] = {}
            for candidate in candidates:
                if candidate == "direct":
                    targets[candidate] = (upstream_url, None)
                    continue
                port = free_port()
                proc = start_server(
                    ["_proxy", candidate, "--port", str(port), "--upstream", upstream_url],
                    PROXY_CPU,
                )
                procs.append(proc)
                url = f"http://{HOST}:{port}/mcp"
                wait_ready(url, proc)
                targets[candidate] = (url, proc.pid)

            for round_no in range(1, args.rounds + 1):
                for level in args.connections:
                    for candidate in candidates:
                        url, pid = targets[candidate]
                        run_wrk(url, level, args.warmup, lua, pid)
                        result = run_wrk(url, level, args.duration, lua, pid)
                        results.setdefault((candidate, level), []).append(result)
                        print(
                            f"round {round_no} {candidate:<15} c={level:<3} "
                            f"{result.rps:>9,.0f} req/s  p50 {result.p50_ms:.2f} ms  "
                            f"p99 {result.p99_ms:.2f} ms  proxy cpu "
                            f"{'-' if pid is None else f'{result.proxy_cpu:.0%}'}  "
                            f"errors {result.errors}",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for proc in reversed(procs):
            stop_server(proc)

    print()
    title = f"median of {args.rounds} rounds" if args.rounds > 1 else "1 round"
    print(
        f"POST /mcp, {len(REQUEST_BODY)}-byte request, {len(RESPONSE_BODY)}-byte response; "
        f"{args.warmup:g} s warm-up + {args.duration:g} s per cell; {title}; "
        f"proxy on CPU {PROXY_CPU}, wrk + upstream on CPU {LOAD_CPU}"
    )
    print_table(
        {key: median_result(value) for key, value in results.items()},
        candidates,
        args.connections,
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")

    up = sub.add_parser("_upstream", help=argparse.SUPPRESS)
    up.add_argument("--port", type=int, required=True)

    px = sub.add_parser("_proxy", help=argparse.SUPPRESS)
    px.add_argument("client", choices=[c for c in CANDIDATES if c != "direct"])
    px.add_argument("--port", type=int, required=True)
    px.add_argument("--upstream", required=True)

    parser.add_argument(
        "-c", "--connections", type=int, nargs="+", default=[1, 16, 64],
        help="wrk concurrency levels (default: 1 16 64)",
    )  # fmt: skip
    parser.add_argument("-d", "--duration", type=int, default=6, help="seconds per run")
    parser.add_argument("-w", "--warmup", type=int, default=2, help="warm-up seconds")
    parser.add_argument("-r", "--rounds", type=int, default=1, help="rounds (median reported)")
    parser.add_argument(
        "--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES),
        help="candidates to run (default: all)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "_upstream":
        serve(upstream_app, args.port)
    elif args.role == "_proxy":
        serve(build_proxy_app(args.client, args.upstream), args.port)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
