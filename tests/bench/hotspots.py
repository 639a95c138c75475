"""Where the proxy spends its CPU under load: py-spy samples, summed per function and per concern.

`run.py --profile` starts the upstream and Keybearer (pinned as in the benchmark), drives
each path with wrk at 16 connections and records it with `py-spy record --format raw`
(one line per distinct stack, with its sample count), then prints:

- per concern (logging, metrics, the upstream call, …): the share of busy samples whose
  stack passes through it;
- the functions in proxy/ by inclusive share; the leaf frames (self time) by file.

Also usable on a raw file recorded by hand:

    py-spy record --pid PID -d 15 -r 250 --format raw -o prof.txt
    .venv/bin/python tests/bench/hotspots.py prof.txt
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Concerns: a stack counts for one when any of its frames matches (file substring, function regex).
CONCERNS: list[tuple[str, str, str]] = [
    (
        "Forwarder.__call__ (all of Keybearer's request handling, the ASGI way)",
        "proxy/forwarding.py",
        r"Forwarder\.__call__",
    ),
    ("the lane: Forwarder.forward_now (checks and send)", "proxy/forwarding.py", r"Forwarder\.forward_now"),
    ("the lane: _Exchange.wake (the answer written back)", "proxy/forwarding.py", r"_Exchange\.wake"),
    (
        "aiohttp ClientSession._request (upstream call to headers)",
        "aiohttp/client.py",
        r"ClientSession\._request",
    ),
    ("Forwarder._relay (response start + body relay)", "proxy/forwarding.py", r"Forwarder\._relay$"),
    ("request log line (structlog + redaction)", "structlog/", r".*"),
    ("  of which logs.redact", "proxy/logs.py", r"redact|_redact|redact_text"),
    ("prometheus metrics", "prometheus_client/", r".*"),
    ("DisconnectWatch (a task per request)", "proxy/forwarding.py", r"DisconnectWatch\."),
    ("asyncio.timeout (2 per request)", "asyncio/timeouts.py", r".*"),
    ("request_headers()", "proxy/forwarding.py", r"^request_headers$"),
    ("response_headers()", "proxy/forwarding.py", r"^response_headers$"),
    ("read_body()", "proxy/forwarding.py", r"^read_body$"),
    ("_mcp_method() (JSON parse of the body)", "proxy/forwarding.py", r"^_mcp_method$"),
    ("_request_id()", "proxy/forwarding.py", r"^_request_id$"),
    ("routing.parse + upstream_url", "proxy/routing.py", r".*"),
    ("inbound auth check", "proxy/inbound.py", r".*"),
    ("yarl URL building", "yarl/", r".*"),
    ("uvicorn ProxyHeadersMiddleware (forwarded headers)", "uvicorn/middleware/proxy_headers.py", r".*"),
    ("OAuth: TokenLifecycle.access_token", "proxy/connect/lifecycle.py", r"TokenLifecycle\.access_token"),
    ("  of which the Redis read (get_connection)", "proxy/stores/redis.py", r"get_connection"),
    ("  of which unseal (AES-GCM + JSON)", "proxy/connect/lifecycle.py", r"^unseal$"),
]
# Self time: the leaf frame's file decides, first match wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("event loop (uvloop, C; shown as Runner.run)", ("asyncio/runners.py",)),
    ("uvicorn protocol (httptools, ASGI send/receive)", ("uvicorn/",)),
    ("Keybearer (proxy/)", ("proxy/",)),
    ("aiohttp client", ("aiohttp/", "multidict/", "yarl/")),
    ("redis client (incl. asyncio streams)", ("redis/", "asyncio/streams.py")),
    ("structlog", ("structlog/",)),
    ("json", ("json/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("asyncio (tasks, timeouts, locks)", ("asyncio/",)),
    ("other", ("",)),
]
IDLE_LEAVES = {("_worker", "concurrent/futures/thread.py")}


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """Stacks of the event loop thread; idle pool workers (a false positive of py-spy) are left out."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            match = FRAME.match(raw)
            if match:
                frames.append((match["func"], match["file"]))
        if frames and frames[-1] in IDLE_LEAVES:
            continue
        stacks.append((frames, int(count)))
    return stacks


def summarize(path: Path, top: int = 15) -> str:
    stacks = parse(path)
    total = sum(count for _, count in stacks)
    if not total:
        return f"{path}: no samples"
    out = [f"{path.name}: {total:,} busy samples"]
    out.append("  self time by layer (leaf frame):")
    layers: Counter[str] = Counter()
    for frames, count in stacks:
        leaf = frames[-1][1] if frames else ""
        layers[next(label for label, parts in LAYERS if any(p in leaf for p in parts))] += count
    for label, count in layers.most_common():
        out.append(f"    {count / total:6.1%}  {label}")
    out.append("  through (share of busy samples whose stack passes through it):")
    for label, file_part, func_re in CONCERNS:
        pattern = re.compile(func_re)
        hits = sum(
            count
            for frames, count in stacks
            if any(file_part in f and pattern.search(fn) for fn, f in frames)
        )
        if hits:
            out.append(f"    {hits / total:6.1%}  {label}")
    inclusive: Counter[str] = Counter()
    self_by_file: Counter[str] = Counter()
    for frames, count in stacks:
        for key in {f"{fn} ({f})" for fn, f in frames if f.startswith("proxy/")}:
            inclusive[key] += count
        if frames:
            self_by_file[f"{frames[-1][0]} ({frames[-1][1]})"] += count
    out.append("  proxy/ functions, inclusive:")
    for key, count in inclusive.most_common(top):
        if "proxy/cli.py" not in key and "proxy/app.py" not in key:
            out.append(f"    {count / total:6.1%}  {key}")
    out.append("  hottest leaf functions (self time):")
    for key, count in self_by_file.most_common(top):
        out.append(f"    {count / total:6.1%}  {key}")
    return "\n".join(out)


def profile(args: Any) -> int:
    """`run.py --profile`: record each Keybearer path under wrk and print the summaries."""
    import run as bench

    py_spy = shutil.which(args.py_spy) or (args.py_spy if Path(args.py_spy).exists() else None)
    if py_spy is None:
        sys.exit("py-spy not found: pip install py-spy (any venv), then --py-spy PATH if not on PATH")
    bench.check_tools()
    from services import POSTGRES_URL, REDIS_URL, unreachable

    outdir = Path(tempfile.mkdtemp(prefix="keybearer-profile-"))
    workdir = outdir / "work"
    workdir.mkdir()
    s = bench.Setup(args, workdir, bench.Processes(workdir))
    s.lua = workdir / "post.lua"
    s.lua.write_text(bench.WRK_LUA)
    if not args.no_shared and not unreachable():
        s.shared = bench.SharedStores(POSTGRES_URL, REDIS_URL)
    summaries = []
    try:
        s.upstream_port = bench.free_port()
        s.upstream = s.procs.start(
            "upstream",
            [sys.executable, bench.PEERS, "upstream", "--port", str(s.upstream_port)],
            bench.LOAD_CPU,
        )
        bench.wait_until(lambda: bench.forwards_ok(f"{s.upstream_base}/mcp"), s.upstream, "upstream")
        kb, port = s.start_keybearer("kb-sidecar", s.sidecar_config("kb-sidecar"), bench.PROXY_CPU)
        paths = [("api_key", f"http://{bench.HOST}:{port}/alice/keyed", kb.pid)]
        if s.shared is not None:
            s.shared.create()
            config = s.shared.config(bench.shared_servers(s))
            seed = workdir / "seed.yaml"
            import yaml

            seed.write_text(yaml.safe_dump({"listen": f"{bench.HOST}:1", **config}))
            s.shared.seed(
                seed,
                s.salt,
                [
                    {
                        "user": "alice",
                        "server": "oauth",
                        "access": "at-alice-profile",
                        "refresh": "rt-alice",
                        "issuer": "http://127.0.0.1:9",
                        "expires_at": time.time() + 86400 * 365,
                    },
                ],
            )
            kb2, port2 = s.start_keybearer("kb-shared", config, bench.PROXY_CPU)
            paths.append(("oauth", f"http://{bench.HOST}:{port2}/alice/oauth", kb2.pid))
        for label, url, pid in paths:
            bench.wait_until(lambda url=url: bench.forwards_ok(url), kb, label)
            raw = outdir / f"{label}.txt"
            svg = outdir / f"{label}.svg"
            wrk = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    bench.LOAD_CPU,
                    "wrk",
                    "-t",
                    "1",
                    "-c",
                    str(args.profile_connections),
                    "-d",
                    f"{2 * args.profile_seconds + 4}s",
                    "-s",
                    str(s.lua),
                    url,
                ],
                stdout=subprocess.DEVNULL,
            )
            try:
                time.sleep(1.5)
                for fmt, target in (("raw", raw), ("flamegraph", svg)):
                    subprocess.run(
                        [
                            py_spy,
                            "record",
                            "--pid",
                            str(pid),
                            "-d",
                            str(args.profile_seconds),
                            "-r",
                            "250",
                            "--format",
                            fmt,
                            "-o",
                            str(target),
                        ],
                        check=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            finally:
                wrk.terminate()
                wrk.wait()
            summaries.append(summarize(raw))
    finally:
        s.procs.stop_all()
        if s.shared is not None:
            s.shared.drop()
    print()
    for text in summaries:
        print(text)
        print()
    print(f"raw stacks and flame graphs (SVG) in {outdir}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarize py-spy raw (collapsed) stacks.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.files:
        print(summarize(path, args.top))
        print()


if __name__ == "__main__":
    main()
