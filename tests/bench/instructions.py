#!/usr/bin/env python3
"""Instructions per forwarded request, counted by valgrind's callgrind.

CPU time on this shared 2-core machine moves by 10-20% between runs; an
instruction count does not: the same tree, requests and environment give the
same count within a fraction of a percent, whatever else the machine is doing.
It counts user-space instructions only (not the kernel's share: the system
calls themselves), so it complements `run.py`'s CPU µs/req rather than
replacing it.

The proxy (one api_key server, as in section 1) runs under callgrind with
collection off; after a warm-up, collection is switched on for exactly `-n`
requests sent by `-c` keep-alive connections of this script, then dumped.

    .venv/bin/python tests/bench/instructions.py                       # this tree
    .venv/bin/python tests/bench/instructions.py --source /tmp/base    # another tree's proxy/
    .venv/bin/python tests/bench/instructions.py --annotate 25         # and the top C functions
    .venv/bin/python tests/bench/instructions.py --syscalls            # system calls instead (strace -c)
    .venv/bin/python tests/bench/instructions.py --app static          # the parts, see below

`--app` measures, instead of Keybearer, what its parts cost on their own, served
the way Keybearer is (uvicorn, httptools, uvloop, serving.py's protocol, the same
uvicorn options): `static` answers the upstream's 300-byte body itself (uvicorn's
share); `pool` forwards with proxy/upstream.py's Pool and relays the answer
with no other work (uvicorn plus the upstream client). Keybearer minus `pool` is
the rest of the forwarding path.

Needs valgrind (Debian: valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402
from client_choice import REQUEST_BODY  # noqa: E402


def request_bytes(port: int, path: str) -> bytes:
    # What wrk sends with client_choice.WRK_LUA.
    body = REQUEST_BODY.encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {bench.HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def drive(port: int, path: str, total: int, connections: int) -> None:
    """`total` requests over `connections` keep-alive connections, one at a time on each."""
    payload = request_bytes(port, path)
    per, extra = divmod(total, connections)

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection(bench.HOST, port)
        for _ in range(count):
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:200]!r}")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length is None:
                raise RuntimeError(f"no content-length: {head[:400]!r}")
            await reader.readexactly(int(length.group(1)))
        writer.close()

    await asyncio.gather(*(one(per + (i < extra)) for i in range(connections)))


def floor_app(kind: str, upstream: str) -> object:
    from client_choice import RESPONSE_BODY

    from proxy import upstream as client

    pool = client.Pool(5.0)
    origin, target = client.split_url(upstream)
    answer = RESPONSE_BODY
    static_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    auth = [(b"content-type", b"application/json"), (b"authorization", b"Bearer bench")]

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if kind == "static":
            await send({"type": "http.response.start", "status": 200, "headers": static_headers})
            await send({"type": "http.response.body", "body": answer})
            return
        response = await pool.request("POST", origin, target, auth, body, 30.0)
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": response.headers}
            )
            while chunk := await response.read(30.0):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.close()

    return app


def serve_floor(kind: str, port: int, upstream: str) -> None:
    import functools

    import uvicorn

    from proxy.serving import InboundLimits, LimitedHttpToolsProtocol

    uvicorn.run(
        floor_app(kind, upstream),  # type: ignore[arg-type]
        host=bench.HOST,
        port=port,
        loop="uvloop",
        http=functools.partial(LimitedHttpToolsProtocol, limits=InboundLimits(16384, 10.0, 10000)),  # type: ignore[arg-type]
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def count_syscalls(pid: int, port: int, args: argparse.Namespace) -> None:
    trace = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid)], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    time.sleep(1.0)  # attached
    asyncio.run(drive(port, "/alice/keyed", args.requests, args.connections))
    time.sleep(0.5)
    trace.send_signal(signal.SIGINT)
    _, summary = trace.communicate(timeout=30)
    rows = [line.split() for line in summary.splitlines() if re.match(r"^\s*[\d.]+\s+[\d.]+\s+\d+", line)]
    calls = {row[-1]: int(row[3]) for row in rows if row[-1] != "total"}
    total = sum(calls.values())
    source = args.source or "this tree"
    if args.app != "keybearer":
        source += f", --app {args.app}"
    detail = ", ".join(
        f"{name} {n / args.requests:.2f}" for name, n in sorted(calls.items(), key=lambda kv: -kv[1])
    )
    print(f"{source}: {total / args.requests:.2f} system calls/request ({detail})")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--requests", type=int, default=2000)
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--source", help="a folder holding the proxy/ package to measure instead")
    parser.add_argument(
        "--annotate", type=int, default=0, metavar="N", help="print the N costliest functions"
    )
    parser.add_argument("--app", choices=("keybearer", "static", "pool", "floor"), default="keybearer")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--syscalls", action="store_true", help="count system calls (strace) instead")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (callgrind output, logs)")
    args = parser.parse_args()
    if args.serve:  # the process measured for --app static|pool
        serve_floor(args.serve[0], int(args.serve[1]), args.serve[2])
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found (Debian: apt-get install valgrind)")

    workdir = Path(tempfile.mkdtemp(prefix="keybearer-instructions-"))
    procs = bench.Processes(workdir)
    try:
        up_port = bench.free_port()
        upstream = procs.start(
            "upstream", [sys.executable, bench.PEERS, "upstream", "--port", str(up_port)], None
        )
        bench.wait_until(
            lambda: bench.forwards_ok(f"http://{bench.HOST}:{up_port}/mcp"), upstream, "upstream"
        )
        import yaml

        port = bench.free_port()
        config = workdir / "kb.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"{bench.HOST}:{port}",
                    "public_url": f"http://{bench.HOST}:{port}",
                    "database_url": f"sqlite:///{workdir}/kb.db",
                    "servers": {
                        "keyed": {
                            "url": f"http://{bench.HOST}:{up_port}/mcp",
                            "auth": "api_key",
                            "api_key_env": "BENCH_KEY",
                        }
                    },
                }
            )
        )
        out = workdir / "callgrind.out"
        env = {"KEYBEARER_SALT": bench.random_salt(), "BENCH_KEY": bench.API_KEY, "PYTHONHASHSEED": "0"}
        if args.source:
            env["PYTHONPATH"] = str(Path(args.source).resolve())
        tool = (
            []
            if args.syscalls
            else ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        )
        if args.app == "keybearer":
            command = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        elif args.app == "floor":
            upstream_url = f"http://{bench.HOST}:{up_port}/mcp"
            command = [
                sys.executable,
                bench.PEERS,
                "protocol-floor",
                "--port",
                str(port),
                "--upstream",
                upstream_url,
            ]
        else:
            upstream_url = f"http://{bench.HOST}:{up_port}/mcp"
            command = [sys.executable, __file__, "--serve", args.app, str(port), upstream_url]
        kb = procs.start(
            "keybearer",
            [*tool, *command],
            None,
            env=env,
            cwd=args.source or None,
        )
        url = f"http://{bench.HOST}:{port}/alice/keyed"
        bench.wait_until(lambda: bench.forwards_ok(url), kb, "keybearer under valgrind", timeout=180)
        asyncio.run(drive(port, "/alice/keyed", args.warmup, args.connections))
        time.sleep(0.5)  # batched log lines of the warm-up written
        if args.syscalls:
            count_syscalls(kb.pid, port, args)
            return 0
        callgrind_control("--instr=on", str(kb.pid))
        asyncio.run(drive(port, "/alice/keyed", args.requests, args.connections))
        time.sleep(0.5)  # and those of the measured requests
        callgrind_control("--instr=off", str(kb.pid))
        callgrind_control("--dump", str(kb.pid))
        dump = workdir / "callgrind.out.1"  # the first --dump (the file without a suffix is the exit's)
        totals = re.findall(r"^totals:\s*(\d+)", dump.read_text(errors="replace"), re.MULTILINE)
        if not totals:
            raise RuntimeError(f"no totals in {dump}")
        instructions = int(totals[-1])
        source = args.source or "this tree"
        if args.app != "keybearer":
            source += f", --app {args.app}"
        print(
            f"{source}: {instructions / args.requests:,.0f} instructions/request "
            f"({instructions:,} for {args.requests} requests, {args.connections} connections)"
        )
        if args.annotate:
            annotated = subprocess.run(
                ["callgrind_annotate", "--inclusive=no", str(dump)], capture_output=True, text=True
            ).stdout
            lines = [line for line in annotated.splitlines() if re.match(r"^\s*[\d,]+ \(", line)]
            print("\n".join(lines[: args.annotate + 1]))
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
