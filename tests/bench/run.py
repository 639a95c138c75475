#!/usr/bin/env python3
"""Keybearer's benchmark (`make bench`): one run on loopback, one table, PASS/FAIL per target.

Every process is separate and pinned: the proxy under test on CPU 0, the load generator
(wrk, or a Python client) and the upstream on CPU 1. The machine is small and shared, so
only figures from the same run are compared, as ratios.

1. Forwarding: wrk POSTs a JSON-RPC body at 1, 16 and 64 connections to the upstream
   directly, to nginx (1 worker, proxy_pass + a fixed Authorization header), to a bare
   aiohttp pass-through (the floor Python allows), to the same pass-through as a raw ASGI
   app on uvicorn (the floor of Keybearer's serving stack), and to Keybearer (auth none and
   api_key on SQLite; oauth with a stored token on PostgreSQL + Redis), and the api_key
   sidecar again with every request traced to a local OTLP receiver (`--no-traced` skips it).
2. Event streams: delay of stamped events from upstream to client, direct and through
   Keybearer; 5,000 idle GET streams through Keybearer: its RSS and CPU while idle.
3. Refresh storm: 3 Keybearer replicas sharing PostgreSQL + Redis, one expired token,
   500 concurrent requests: token requests seen by the authorization server, time to finish.
   Then 1,000 users whose tokens expired at once, each asked for on every replica.
4. Workers: one Keybearer worker against two (KEYBEARER_WORKERS=2), unpinned, with wrk's
   and the upstream's CPU beside them.
5. Many users: the OAuth path for one user and for 10,000 round-robin, on one proxy with a
   Redis of its own (its INFO commandstats gives Redis commands per request).
6. Many servers: 1,000 servers (half file, half store, 250 of those with a stored API key)
   and 100,000 stored connections against section 1's 5: start-up time and CPU (medians of
   5 starts), RSS, CPU per request (two rounds in opposite orders).
--soak: RSS under traffic from the 10,000 users of section 5, and its slope.

    .venv/bin/python tests/bench/run.py            # about 6 minutes
    .venv/bin/python tests/bench/run.py --quick    # about 2 minutes
    .venv/bin/python tests/bench/run.py --profile  # py-spy hot spots of the proxy under load
    .venv/bin/python tests/bench/run.py --sections 1 -c 16 -r 3 --compare NAME=/tmp/copy
        # a scratch copy of the proxy (/tmp/copy/proxy) measured beside the original

Options: --help. docs/performance.md has the latest table and what limits each target.

Needs wrk, taskset and nginx (tests/system-deps.sh bench), PostgreSQL and Redis for the
OAuth rows and the storm (TEST_POSTGRES_URL, TEST_REDIS_URL; skipped with a note if down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from client_choice import REQUEST_BODY, RESPONSE_BODY, WRK_LUA  # noqa: E402

HOST = "127.0.0.1"
PROXY_CPU = "0"
LOAD_CPU = "1"
PEERS = str(HERE / "bench_peers.py")
VENV_BIN = Path(sys.executable).parent
KEYBEARER = str(VENV_BIN / "keybearer")
API_KEY = "bench-api-key-" + secrets.token_hex(8)

# Targets (one worker, same run).
TARGET_API_KEY_RATIO = 0.90
TARGET_OAUTH_RATIO = 0.85
TARGET_ADDED_P50_MS = 0.6
# Issue 17: the api_key path's CPU per request against nginx's, same run, 16 clients.
TARGET_CPU_VS_NGINX = 2.5
PROTOCOL_FLOOR = "protocol floor (asyncio)"
TARGET_IDLE_RSS_MB = 400
TARGET_SSE_P99_MS = 5.0
TRACED = "keybearer api_key, traced"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _raise_nofile() -> None:
    """preexec_fn: the child's `ulimit -n` at its hard limit (5,000 streams need 10,000+ fds)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def random_salt() -> str:
    from proxy.crypto import SecretError, check_salt

    while True:
        salt = secrets.token_urlsafe(36)  # 48 characters
        try:
            return check_salt(salt)
        except SecretError:
            continue


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Every process the benchmark starts; all stopped in `stop_all`, by pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        command: list[str],
        cpu: str | None,
        env: dict[str, str] | None = None,
        **kw: Any,
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        pinned = ["taskset", "-c", cpu, *command] if cpu is not None else command
        popen = subprocess.Popen(
            pinned,
            stdin=kw.pop("stdin", subprocess.DEVNULL),
            stdout=kw.pop("stdout", log.open("wb")),
            stderr=subprocess.STDOUT if "stderr" not in kw else kw.pop("stderr"),
            env={**os.environ, **(env or {})},
            preexec_fn=_raise_nofile,
            start_new_session=True,
            **kw,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGINT)
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)
        # Workers of a multi-process server are in its session (process group): end them too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_until(check: Any, proc: Proc, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            if check():
                return
        except OSError as exc:
            last = exc
        time.sleep(0.02)  # start-up times are measured with this: 0.1 s steps hid a 0.05 s difference
    raise RuntimeError(f"{what} not ready after {timeout:g} s ({last}):\n{proc.tail()}")


def post(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=REQUEST_BODY.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def forwards_ok(url: str) -> bool:
    status, body = post(url)
    if status == 200 and body == RESPONSE_BODY:
        return True
    raise RuntimeError(f"{url} answered {status} {body[:200]!r} instead of the upstream's body")


# --------------------------------------------------------------------------- /proc


def _all_stats() -> dict[int, list[str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- wrk


@dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    proxy_cpu: float | None  # cores
    load_cpu: float  # wrk's cores
    other_cpu: float | None = None  # e.g. the upstream's cores

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def us_per_request(self) -> float | None:
        return self.proxy_cpu * 1e6 / self.rps if self.proxy_cpu is not None and self.rps else None


def run_wrk(
    url: str,
    connections: int,
    seconds: int,
    lua: Path,
    proxy_pid: int | None,
    workdir: Path,
    other_pid: int | None = None,
) -> Load:
    command = [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url,
    ]
    proxy_pids = tree(proxy_pid) if proxy_pid else []
    out_path = workdir / "wrk.out"
    with out_path.open("wb") as out:
        cpu_before = cpu_seconds(proxy_pids)
        other_before = cpu_seconds([other_pid]) if other_pid else 0.0
        wall_before = time.monotonic()
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - wall_before
    text = out_path.read_text()
    match = re.search(r"^RESULT (.*)$", text, re.MULTILINE)
    if popen.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({popen.returncode}):\n{text}")
    values = {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}
    return Load(
        requests=values["requests"],
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1e3,
        p99_ms=values["p99_us"] / 1e3,
        errors=sum(v for k, v in values.items() if k.startswith("err_")),
        proxy_cpu=(cpu_seconds(proxy_pids) - cpu_before) / wall if proxy_pids else None,
        load_cpu=(usage.ru_utime + usage.ru_stime) / wall,
        other_cpu=(cpu_seconds([other_pid]) - other_before) / wall if other_pid else None,
    )


def median_load(loads: list[Load]) -> Load:
    import statistics

    if len(loads) == 1:
        return loads[0]
    cpus = [x.proxy_cpu for x in loads if x.proxy_cpu is not None]
    others = [x.other_cpu for x in loads if x.other_cpu is not None]
    return Load(
        requests=round(statistics.median(x.rps for x in loads) * 1000),
        seconds=1000.0,
        p50_ms=statistics.median(x.p50_ms for x in loads),
        p99_ms=statistics.median(x.p99_ms for x in loads),
        errors=sum(x.errors for x in loads),
        proxy_cpu=statistics.median(cpus) if cpus else None,
        load_cpu=statistics.median(x.load_cpu for x in loads),
        other_cpu=statistics.median(others) if others else None,
    )


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    section: str
    figure: str
    clients: str = ""
    rps: str = ""
    p50: str = ""
    p99: str = ""
    ratio: str = ""
    proxy_cpu: str = ""
    load_cpu: str = ""
    us_req: str = ""
    target: str = ""
    result: str = ""
    detail: str = ""


COLUMNS = [
    ("section", "sec", 3, "<"),
    ("figure", "figure", 34, "<"),
    ("clients", "clients", 7, ">"),
    ("rps", "req/s", 8, ">"),
    ("p50", "p50 ms", 7, ">"),
    ("p99", "p99 ms", 7, ">"),
    ("ratio", "vs floor", 8, ">"),
    ("proxy_cpu", "proxy cpu", 9, ">"),
    ("load_cpu", "load cpu", 8, ">"),
    ("us_req", "us/req", 6, ">"),
    ("target", "target", 20, "<"),
    ("result", "result", 20, "<"),
    ("detail", "detail", 0, "<"),
]


def render_table(rows: list[Row]) -> str:
    def line(values: dict[str, str]) -> str:
        cells = []
        for key, _, width, align in COLUMNS:
            text = values[key]
            cells.append(f"{text:{align}{width}}" if width else text)
        return " ".join(cells).rstrip()

    header = line({key: title for key, title, _, _ in COLUMNS})
    out = [header, "-" * len(header)]
    previous = None
    for row in rows:
        if previous is not None and row.section != previous:
            out.append("")
        previous = row.section
        out.append(line(row.__dict__))
    return "\n".join(out)


def pct(cores: float | None) -> str:
    return "-" if cores is None else f"{cores:.0%}"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def verdict(ok: bool, note: str = "") -> str:
    return ("PASS" if ok else "FAIL") + (f" ({note})" if note else "")


# --------------------------------------------------------------------------- the run


@dataclass
class Setup:
    args: argparse.Namespace
    workdir: Path
    procs: Processes
    salt: str = field(default_factory=random_salt)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lua: Path = Path()
    upstream: Proc | None = None
    upstream_port: int = 0
    shared: SharedStores | None = None

    @property
    def upstream_base(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def env(self) -> dict[str, str]:
        return {"KEYBEARER_SALT": self.salt, "BENCH_KEY": API_KEY}

    def start_keybearer(
        self,
        name: str,
        config: dict[str, Any],
        cpu: str | None,
        env: dict[str, str] | None = None,
        source: str | None = None,
    ) -> tuple[Proc, int]:
        import yaml

        port = free_port()
        config = {"listen": f"{HOST}:{port}", "public_url": f"http://{HOST}:{port}", **config}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        extra = {**self.env(), **(env or {})}
        source = source or self.args.source
        if source:  # a scratch copy of the proxy, to measure a change beside the original
            extra["PYTHONPATH"] = source
            command = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
        else:
            command = [KEYBEARER, "serve", "--config", str(path)]
        proc = self.procs.start(name, command, cpu, env=extra, cwd=source or None)
        wait_until(lambda: get(f"http://{HOST}:{port}/ping") == b"ok\n", proc, name)
        return proc, port

    def sidecar_config(self, name: str) -> dict[str, Any]:
        up = self.upstream_base
        return {
            "database_url": f"sqlite:///{self.workdir}/{name}.db",
            "servers": {
                "plain": {"url": f"{up}/mcp", "auth": "none"},
                "keyed": {"url": f"{up}/mcp", "auth": "api_key", "api_key_env": "BENCH_KEY"},
                "ticks": {"url": f"{up}/ticks", "auth": "api_key", "api_key_env": "BENCH_KEY"},
                "idle": {"url": f"{up}/idle", "auth": "api_key", "api_key_env": "BENCH_KEY"},
            },
        }


# --------------------------------------------------------------------------- shared stores


class SharedStores:
    """A fresh PostgreSQL database and Redis prefix for this run; dropped and deleted after."""

    def __init__(self, postgres_url: str, redis_url: str) -> None:
        run = secrets.token_hex(4)
        self.admin_url = postgres_url
        self.name = f"keybearer_bench_{run}"
        self.database_url = f"{postgres_url.rsplit('/', 1)[0]}/{self.name}"
        self.redis_url = redis_url
        self.prefix = f"kbbench-{run}"
        self.created = False

    def create(self) -> None:
        async def go() -> None:
            import asyncpg

            admin = await asyncpg.connect(self.admin_url)
            try:
                await admin.execute(f'CREATE DATABASE "{self.name}"')
            finally:
                await admin.close()

        asyncio.run(go())
        self.created = True

    def drop(self) -> None:
        async def go() -> None:
            import asyncpg
            import redis.asyncio as redis

            if self.created:
                admin = await asyncpg.connect(self.admin_url)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                finally:
                    await admin.close()
            client = redis.from_url(self.redis_url)
            try:
                async for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                    await client.delete(key)
            finally:
                await client.aclose()

        asyncio.run(go())

    def config(self, servers: dict[str, Any]) -> dict[str, Any]:
        return {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "redis_prefix": self.prefix,
            "oauth_allow_http_loopback": True,
            "servers": servers,
        }

    def seed(self, config_path: Path, salt: str, connections: list[dict[str, Any]]) -> None:
        """Migrate, then write each connection's sealed tokens straight into the token store."""

        async def go() -> None:
            from proxy.connect.lifecycle import TokenSet, seal
            from proxy.crypto import Keyring
            from proxy.settings import load_settings
            from proxy.stores import Connection, open_store, open_token_store

            settings = load_settings(str(config_path), env={"KEYBEARER_SALT": salt})
            store = open_store(settings)
            await store.open()
            try:
                await store.migrate()
            finally:
                await store.close()
            keyring = Keyring(salt)
            tokens = open_token_store(settings)
            await tokens.open()
            try:
                for c in connections:
                    sealed = seal(keyring, c["user"], c["server"], TokenSet(c["access"], c["refresh"]))
                    conn = Connection(
                        user=c["user"],
                        server=c["server"],
                        sealed=sealed,
                        issuer=c["issuer"],
                        client_id="bench",
                        scopes=("mcp",),
                        expires_at=c["expires_at"],
                        obtained_at=time.time(),
                        version=1,
                    )
                    await tokens.put_connection(conn)
            finally:
                await tokens.close()

        asyncio.run(go())


# --------------------------------------------------------------------------- 1. forwarding


def section_forwarding(s: Setup) -> dict[tuple[str, int], Load]:
    args = s.args
    up = s.upstream_base
    targets: dict[str, tuple[str, int | None]] = {"direct (no proxy)": (f"{up}/mcp", None)}

    ng_port = free_port()
    ng = start_nginx(s, ng_port)
    targets["nginx, 1 worker"] = (f"http://{HOST}:{ng_port}/alice/keyed", ng.pid)

    for role, name in (("floor", "aiohttp floor"), ("protocol-floor", PROTOCOL_FLOOR)):
        targets[name] = start_floor(s, role, name)
    if not args.no_asgi_floor:
        targets["ASGI floor (uvicorn)"] = start_floor(s, "asgi-floor", "ASGI floor")

    trees: list[tuple[str, str | None]] = [("", None), *((name, path) for name, path in args.compare)]
    for spec, source in trees:
        tag, _, only = spec.partition(":")
        suffix = f" [{tag}]" if tag else ""
        name = f"kb-sidecar-{tag}" if tag else "kb-sidecar"
        if only in ("", "api_key"):
            kb, port = s.start_keybearer(name, s.sidecar_config(name), PROXY_CPU, source=source)
            for server, label in (("plain", "none"), ("keyed", "api_key")):
                if tag and server == "plain":
                    continue
                url = f"http://{HOST}:{port}/alice/{server}"
                wait_until(lambda url=url, kb=kb: forwards_ok(url), kb, name)
                targets[f"keybearer {label}{suffix}"] = (url, kb.pid)
        if s.shared is not None and only in ("", "oauth"):
            shared_name = f"kb-shared-{tag}" if tag else "kb-shared"
            kb, port = s.start_keybearer(
                shared_name, s.shared.config(shared_servers(s)), PROXY_CPU, source=source
            )
            url = f"http://{HOST}:{port}/alice/oauth"
            wait_until(lambda url=url: forwards_ok(url), kb, shared_name)
            targets[f"keybearer oauth{suffix}"] = (url, kb.pid)
    otlp_stats = ""
    if not args.no_traced:
        otlp_stats, targets[TRACED] = start_traced(s)

    loads: dict[tuple[str, int], list[Load]] = {}
    for round_no in range(1, args.rounds + 1):
        for level in args.connections:
            for name, (url, pid) in targets.items():
                run_wrk(url, level, args.warmup, s.lua, pid, s.workdir)
                load = run_wrk(url, level, args.duration, s.lua, pid, s.workdir)
                loads.setdefault((name, level), []).append(load)
                s.say(
                    f"  [1] round {round_no} {name:<28} c={level:<3} {load.rps:>8,.0f} req/s  "
                    f"p50 {load.p50_ms:.2f}  p99 {load.p99_ms:.2f} ms  proxy {pct(load.proxy_cpu)}  "
                    f"errors {load.errors}"
                )
    result = {key: median_load(value) for key, value in loads.items()}
    for url, _ in targets.values():
        forwards_ok(url)  # still forwarding correctly after the load
    if otlp_stats:
        s.say(f"  [1] OTLP receiver: {json.loads(get(otlp_stats))}")

    for level in args.connections:
        floor = result.get(("aiohttp floor", level))
        direct = result.get(("direct (no proxy)", level))
        for name in targets:
            load = result[(name, level)]
            row = Row(
                "1",
                name,
                str(level),
                f"{load.rps:,.0f}",
                ms(load.p50_ms),
                ms(load.p99_ms),
                f"{load.rps / floor.rps:.2f}" if floor and floor.rps else "-",
                pct(load.proxy_cpu),
                pct(load.load_cpu),
                f"{load.us_per_request:.0f}" if load.us_per_request else "-",
            )
            if load.errors:
                row.detail = f"{load.errors} errors"
            untraced = result.get(("keybearer api_key", level))
            if name == TRACED and untraced and load.us_per_request and untraced.us_per_request:
                added = load.us_per_request - untraced.us_per_request
                row.detail = f"tracing adds {added:+.0f} us CPU/req; {row.detail}".rstrip("; ")
            base = name.split(" [")[0]
            if base in ("keybearer api_key", "keybearer oauth") and level == 16 and floor:
                want = TARGET_API_KEY_RATIO if base.endswith("api_key") else TARGET_OAUTH_RATIO
                row.target = f">= {want:.2f}x floor"
                row.result = verdict(load.rps >= want * floor.rps and not load.errors)
            if base in ("keybearer api_key", "keybearer oauth") and level == 1 and direct:
                added = load.p50_ms - direct.p50_ms
                row.target = f"p50 +<= {TARGET_ADDED_P50_MS} ms"
                row.result = verdict(added <= TARGET_ADDED_P50_MS and not load.errors, f"+{added:.2f}")
            s.rows.append(row)
        s.rows.extend(cpu_vs_nginx_rows(result, targets, level))
    return result


def start_floor(s: Setup, role: str, name: str) -> tuple[str, int | None]:
    """One of bench_peers.py's pass-throughs to the upstream, on the proxy's CPU."""
    port = free_port()
    proc = s.procs.start(
        role,
        [sys.executable, PEERS, role, "--port", str(port), "--upstream", f"{s.upstream_base}/mcp"],
        PROXY_CPU,
    )
    url = f"http://{HOST}:{port}/alice/keyed"
    wait_until(lambda: forwards_ok(url), proc, name)
    return url, proc.pid


def cpu_vs_nginx_rows(result: dict[tuple[str, int], Load], targets: dict[str, Any], level: int) -> list[Row]:
    """Each api_key row's CPU per request over nginx's; at 16 clients, the target."""
    nginx = result.get(("nginx, 1 worker", level))
    if nginx is None or not nginx.us_per_request:
        return []
    rows = []
    for name in targets:
        load = result[(name, level)]
        floor = name == PROTOCOL_FLOOR  # what any Python proxy costs: no target, for scale
        if not (floor or name.startswith("keybearer api_key")) or name == TRACED or not load.us_per_request:
            continue
        ratio = load.us_per_request / nginx.us_per_request
        row = Row("1", f"{name.replace('keybearer ', '')} / nginx cpu", str(level), us_req=f"{ratio:.2f}x")
        row.detail = f"{load.us_per_request:.0f} vs {nginx.us_per_request:.0f} us CPU/req"
        if level == 16 and not floor:
            row.target = f"cpu <= {TARGET_CPU_VS_NGINX:g}x nginx"
            row.result = verdict(ratio <= TARGET_CPU_VS_NGINX, f"{ratio:.2f}x")
        rows.append(row)
    return rows


def start_traced(s: Setup) -> tuple[str, tuple[str, int | None]]:
    """The api_key sidecar with every request traced (sampled at 1.0) to a local OTLP
    receiver: its us/req beside the untraced row's is what tracing costs."""
    port = free_port()
    receiver = s.procs.start("otlp", [sys.executable, PEERS, "otlp", "--port", str(port)], LOAD_CPU)
    stats = f"http://{HOST}:{port}/stats"
    wait_until(lambda: get(stats) is not None, receiver, "OTLP receiver")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{port}", "OTEL_TRACES_SAMPLER": "always_on"}
    kb, kb_port = s.start_keybearer("kb-traced", s.sidecar_config("kb-traced"), PROXY_CPU, env=env)
    url = f"http://{HOST}:{kb_port}/alice/keyed"
    wait_until(lambda: forwards_ok(url), kb, "kb-traced")
    return stats, (url, kb.pid)


def shared_servers(s: Setup, peer_port: int | None = None) -> dict[str, Any]:
    servers: dict[str, Any] = {
        "oauth": {"url": f"{s.upstream_base}/mcp", "auth": "oauth", "client_id": "bench"},
    }
    if peer_port:
        servers["guarded"] = {"url": f"http://{HOST}:{peer_port}/mcp", "auth": "oauth", "client_id": "bench"}
    return servers


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    upstream bench_upstream {{
        server {host}:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen {host}:{port};
        location / {{
            rewrite ^ /mcp break;
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer bench-nginx-token";
        }}
    }}
}}
"""


def start_nginx(s: Setup, port: int) -> Proc:
    conf = s.workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=s.workdir, host=HOST, upstream_port=s.upstream_port, port=port))
    proc = s.procs.start(
        "nginx",
        ["nginx", "-e", str(s.workdir / "nginx-error.log"), "-p", str(s.workdir), "-c", str(conf)],
        PROXY_CPU,
    )
    url = f"http://{HOST}:{port}/alice/keyed"
    wait_until(lambda: forwards_ok(url), proc, "nginx")
    return proc


# --------------------------------------------------------------------------- 2. event streams


def run_client(s: Setup, role: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    command = ["taskset", "-c", LOAD_CPU, sys.executable, PEERS, role, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=_raise_nofile)
    if done.returncode != 0:
        raise RuntimeError(f"{role} client failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def section_streams(s: Setup, kb: Proc, kb_port: int) -> None:
    args = s.args
    probes = {
        "SSE event delay, direct": f"{s.upstream_base}/ticks?ms={args.sse_interval_ms}",
        "SSE event delay, keybearer": f"http://{HOST}:{kb_port}/alice/ticks?ms={args.sse_interval_ms}",
    }
    for name, url in probes.items():
        result = run_client(
            s, "sse", "--url", url, "--streams", str(args.sse_streams), "--seconds", str(args.sse_seconds)
        )
        s.say(f"  [2] {name}: {result}")
        row = Row(
            "2",
            name,
            f"{args.sse_streams}",
            "",
            ms(result["p50_ms"]),
            ms(result["p99_ms"]),
            detail=f"{result['events']:,} events, 1 per {args.sse_interval_ms:g} ms per stream, "
            f"max {ms(result['max_ms'])} ms"
            + (f", {result['error_count']} errors" if result["error_count"] else ""),
        )
        if name.endswith("keybearer"):
            ok = (
                result["p99_ms"] is not None
                and result["p99_ms"] <= TARGET_SSE_P99_MS
                and not result["error_count"]
            )
            row.target, row.result = f"p99 <= {TARGET_SSE_P99_MS:g} ms", verdict(ok)
        s.rows.append(row)

    # Idle streams.
    n = args.streams
    pids = tree(kb.pid)
    rss_before = rss_mb(pids)
    up_pids = tree(s.upstream.pid) if s.upstream else []
    url = f"http://{HOST}:{kb_port}/alice/idle"
    client = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, sys.executable, PEERS, "idle", "--url", url, "--streams", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_raise_nofile,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        ready, _, _ = select.select([client.stdout], [], [], 180)
        if not ready:
            raise RuntimeError("idle-stream client did not report within 180 s")
        opened = json.loads(client.stdout.readline() or b"{}")
        if not opened:
            raise RuntimeError(
                f"idle-stream client failed: {client.stderr.read().decode()[-2000:] if client.stderr else ''}"
            )
        time.sleep(1.0)  # let the last opens settle
        cpu_before, wall_before = cpu_seconds(pids), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds(pids) - cpu_before) / (time.monotonic() - wall_before)
        rss_open = rss_mb(pids)
        up_rss = rss_mb(up_pids)
        client.stdin.close()
        client.wait(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    time.sleep(2.0)
    rss_after = rss_mb(pids)
    s.say(
        f"  [2] idle streams: {opened}; RSS {rss_before:.0f} -> {rss_open:.0f} -> {rss_after:.0f} MB; "
        f"idle cpu {idle_cpu:.1%}"
    )
    per_stream = (rss_open - rss_before) * 1024 / max(1, opened["opened"])
    ok = rss_open < TARGET_IDLE_RSS_MB and opened["opened"] == n
    s.rows.append(
        Row(
            "2",
            f"{n:,} idle streams, keybearer",
            f"{n}",
            proxy_cpu=f"{idle_cpu:.1%}",
            target=f"RSS < {TARGET_IDLE_RSS_MB} MB",
            result=verdict(ok, f"{rss_open:.0f} MB"),
            detail=f"{opened['opened']:,} open ({opened['failed']} failed) in {opened['seconds']:.1f} s; RSS "
            f"{rss_before:.0f} MB before, +{per_stream:.0f} KB/stream, {rss_after:.0f} MB after close; "
            f"upstream RSS {up_rss:.0f} MB",
        )
    )


# --------------------------------------------------------------------------- 3. refresh storm


def section_storm(s: Setup) -> None:
    """One expired token, a burst over every replica: exactly one token request. Then
    tokens that live shorter than refresh_skew, under steady load: one token request
    per lifetime, never one per request."""
    storm, fresh, refreshes, stats = run_storm(s, expires_in=3600, bursts=2, pause=0.5)
    args = s.args
    all_ok = storm["body_ok"] == args.storm
    ok = refreshes == 1 and stats.get("refresh_reused", 0) == 0 and all_ok
    failed = args.storm - storm["body_ok"]
    detail = (
        f"all done in {storm['all_done_ms']:.0f} ms; {storm['body_ok']}/{args.storm} forwarded "
        f"with the new token; statuses {storm['statuses']}; AS: {refreshes} token request(s), "
        f"{stats.get('refresh_reused', 0)} reused, token endpoint delay {args.token_delay_ms:g} ms"
    )
    s.rows.append(
        Row(
            "3",
            f"refresh storm, {args.replicas} replicas",
            str(args.storm),
            "",
            ms(storm["p50_ms"]),
            ms(storm["p99_ms"]),
            target="1 token request",
            result=verdict(ok, f"{refreshes}" + (f", {failed} failed" if failed else "")),
            detail=detail,
        )
    )
    s.rows.append(
        Row(
            "3",
            "same burst, token now fresh",
            str(args.storm),
            "",
            ms(fresh["p50_ms"]),
            ms(fresh["p99_ms"]),
            detail=f"all done in {fresh['all_done_ms']:.0f} ms; statuses {fresh['statuses']}",
        )
    )
    lifetime, bursts, pause = SHORT_TOKEN_SECONDS, 12, 1.0
    first, *rest, refreshes, stats = run_storm(s, expires_in=lifetime, bursts=bursts, pause=pause)
    last = rest[-1] if rest else first
    # Due a quarter of a lifetime before expiry: one request per 3/4 of it, plus the first.
    span = bursts * pause + sum(b["all_done_ms"] for b in (first, *rest)) / 1000
    expected = int(span // (lifetime * 0.75)) + 1
    forwarded = sum(b["body_ok"] for b in (first, *rest))
    ok = (
        refreshes <= expected + 1 and stats.get("refresh_reused", 0) == 0 and forwarded == args.storm * bursts
    )
    s.rows.append(
        Row(
            "3",
            f"{lifetime} s tokens (< refresh_skew), {args.replicas} replicas",
            str(args.storm),
            "",
            ms(last["p50_ms"]),
            ms(last["p99_ms"]),
            target=f"<= {expected + 1} token requests",
            result=verdict(ok, str(refreshes)),
            detail=f"{bursts} bursts over {span:.1f} s, {forwarded}/{args.storm * bursts} forwarded; "
            f"{stats.get('refresh_reused', 0)} refresh tokens reused",
        )
    )


# Shorter than refresh_skew's default (60 s): before, every request refreshed.
SHORT_TOKEN_SECONDS = 4


def section_storm_users(s: Setup) -> None:
    """Many users whose tokens expired at once, each asked for on every replica: one
    token request per user, every request forwarded."""
    args = s.args
    users = args.storm_users
    (burst, refreshes, stats) = run_storm(
        s, expires_in=3600, bursts=1, pause=0.0, users=users, requests=users * args.replicas
    )
    n = users * args.replicas
    ok = (stats.get("grants") == users and stats.get("most_per_grant") == 1 and refreshes == users
          and stats.get("refresh_reused", 0) == 0 and burst["body_ok"] == n)  # fmt: skip
    s.rows.append(
        Row(
            "3",
            f"storm, {users:,} users, {args.replicas} replicas",
            str(n),
            "",
            ms(burst["p50_ms"]),
            ms(burst["p99_ms"]),
            target="1 token req per user",
            result=verdict(ok, f"{refreshes} for {users}"),
            detail=f"last done in {burst['all_done_ms']:.0f} ms; {burst['body_ok']}/{n} forwarded with the "
            f"new token; statuses {burst['statuses']}; AS: {refreshes} token requests for "
            f"{stats.get('grants', 0)} users, at most {stats.get('most_per_grant', 0)} per user, "
            f"{stats.get('refresh_reused', 0)} reused"
            + (f"; refused: {burst['refusals']}" if burst.get("refusals") else ""),
        )
    )


def run_storm(
    s: Setup, *, expires_in: int, bursts: int, pause: float, users: int = 0, requests: int = 0
) -> Any:
    """Bursts of concurrent requests over the replicas for one seeded, expired connection;
    returns each burst's figures, then the token requests and the peer's stats."""
    assert s.shared is not None
    args = s.args
    peer_port = free_port()
    peer = s.procs.start(
        "oauth-peer",
        [
            sys.executable, PEERS, "oauth", "--port", str(peer_port),
            "--token-delay-ms", str(args.token_delay_ms), "--expires-in", str(expires_in),
        ],
        LOAD_CPU,
    )  # fmt: skip
    peer_base = f"http://{HOST}:{peer_port}"
    wait_until(lambda: get(f"{peer_base}/stats") is not None, peer, "oauth peer")
    config = s.shared.config(shared_servers(s, peer_port))
    config_path = s.workdir / "storm-seed.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump({"listen": f"{HOST}:1", **config}))
    names = [f"u{i}" for i in range(users)] if users else ["storm"]
    s.shared.seed(
        config_path,
        s.salt,
        [
            {
                "user": name,
                "server": "guarded",
                "access": "at-0-expired",
                "refresh": f"{name}:seed",
                "issuer": peer_base,
                "expires_at": time.time() - 60,
            }
            for name in names
        ],
    )
    replicas = []
    for i in range(args.replicas):
        proc, port = s.start_keybearer(f"kb-replica-{i}", config, PROXY_CPU)
        replicas.append((proc, port))
    bases = [f"http://{HOST}:{port}" for _, port in replicas]
    result = run_client(
        s, "burst", "--bases", *bases, "--path", "/{user}/guarded" if users else "/storm/guarded",
        "-n", str(requests or args.storm), "--repeat", str(bursts), "--pause", str(pause),
        "--users", str(users or 1),
    )  # fmt: skip
    stats = json.loads(get(f"{peer_base}/stats"))
    s.say(f"  [3] storm ({expires_in} s tokens): {result}; authorization server: {stats}")
    for proc, _ in replicas:
        s.procs.stop(proc)
    s.procs.stop(peer)
    return (*result["bursts"], stats.get("token_requests", 0), stats)


# --------------------------------------------------------------------------- 4. workers


def worker_processes(pid: int) -> int:
    return sum(1 for child in tree(pid)[1:] if "spawn_main" in cmdline(child))


def section_workers(s: Setup) -> None:
    args = s.args
    started = {}
    for workers in (1, 2):
        name = f"kb-workers-{workers}"
        proc, port = s.start_keybearer(
            name, s.sidecar_config(name), None, env={"KEYBEARER_WORKERS": str(workers)}
        )
        url = f"http://{HOST}:{port}/alice/keyed"
        wait_until(lambda url=url: forwards_ok(url), proc, name)
        time.sleep(0.5)
        started[workers] = (proc, url, worker_processes(proc.pid))
    honoured = started[2][2] >= 2
    loads: dict[tuple[int, int], Load] = {}
    for level in args.worker_connections:
        for workers, (proc, url, _) in started.items():
            run_wrk(url, level, args.warmup, s.lua, proc.pid, s.workdir)
            loads[(workers, level)] = run_wrk(
                url,
                level,
                args.duration,
                s.lua,
                proc.pid,
                s.workdir,
                other_pid=s.upstream.pid if s.upstream else None,
            )
            load = loads[(workers, level)]
            s.say(
                f"  [4] workers={workers} c={level}: {load.rps:,.0f} req/s, proxy {pct(load.proxy_cpu)}, "
                f"wrk {pct(load.load_cpu)}, upstream {pct(load.other_cpu)}"
            )
        one, two = loads[(1, level)], loads[(2, level)]
        for workers, load in ((1, one), (2, two)):
            row = Row(
                "4",
                f"api_key, {workers} worker{'s' if workers > 1 else ''}, unpinned",
                str(level),
                f"{load.rps:,.0f}",
                ms(load.p50_ms),
                ms(load.p99_ms),
                "",
                pct(load.proxy_cpu),
                pct(load.load_cpu),
                f"{load.us_per_request:.0f}" if load.us_per_request else "-",
                detail=f"upstream cpu {pct(load.other_cpu)}",
            )
            if workers == 2:
                row.detail += f"; {two.rps / one.rps:.2f}x one worker" if one.rps else ""
                if not honoured:
                    row.result = "pending"
                    row.detail += f"; KEYBEARER_WORKERS=2 ignored ({started[2][2]} worker processes)"
            s.rows.append(row)
    for proc, _, _ in started.values():
        s.procs.stop(proc)


# --------------------------------------------------------------------------- 5. many users

TARGET_MANY_USERS_RATIO = 0.90

# WRK_LUA's request, sent for a different user each time, round-robin.
ROTATE_LUA = """
local users, server, n = {users}, "{server}", 0
request = function()
  n = n + 1
  return wrk.format(nil, "/u" .. (n % users) .. "/" .. server)
end
"""


def start_private_redis(s: Setup, name: str) -> tuple[Proc, str]:
    """A Redis of the run's own, so that its command counts are this proxy's alone."""
    import redis

    port = free_port()
    proc = s.procs.start(
        name,
        ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"],
        LOAD_CPU,
    )
    url = f"redis://{HOST}:{port}/0"

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.RedisError:
            return False

    wait_until(up, proc, name)
    return proc, url


def redis_calls(url: str) -> int:
    """Commands Redis has run (INFO commandstats), not counting INFO itself."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


def seed_users(redis_url: str, prefix: str, salt: str, pairs: list[tuple[str, str]]) -> None:
    """Connected users written the way RedisTokenStore.put_connection writes them,
    a thousand to a pipeline (one round trip each, rather than three per user)."""

    async def go() -> None:
        from proxy.connect.lifecycle import TokenSet, seal
        from proxy.crypto import Keyring
        from proxy.stores import Connection
        from proxy.stores.redis import RedisTokenStore, _encode

        store = RedisTokenStore.from_url(redis_url, prefix=prefix)
        keyring = Keyring(salt)
        expires = time.time() + 10 * 365 * 86400
        try:
            for start in range(0, len(pairs), 1000):
                pipe = store.client.pipeline(transaction=False)
                for user, server in pairs[start : start + 1000]:
                    sealed = seal(keyring, user, server, TokenSet(f"at-{user}", f"rt-{user}"))
                    conn = Connection(
                        user=user, server=server, sealed=sealed, issuer="http://127.0.0.1:9",
                        client_id="bench", scopes=("mcp",), expires_at=expires, obtained_at=time.time(),
                        version=1,
                    )  # fmt: skip
                    fields = _encode(conn)
                    pipe.sadd(store._server_users(server), user)
                    pipe.sadd(store._user_servers(user), server)
                    pipe.hset(
                        store._tokens(user, server), mapping=dict(zip(fields[::2], fields[1::2], strict=True))
                    )
                await pipe.execute()
        finally:
            await store.close()

    asyncio.run(go())


@dataclass
class UsersProxy:
    kb: Proc
    url: str  # user u0's
    redis: Proc
    redis_url: str
    rotate: Path  # the wrk script that rotates the user
    single: Path  # the same script over user u0 alone


def start_users_proxy(s: Setup, name: str, users: list[str]) -> UsersProxy:
    """A proxy on its own Redis, where each user is connected to `oauth`."""
    assert s.shared is not None
    redis_proc, redis_url = start_private_redis(s, f"redis-{name}")
    prefix = f"kbusers-{secrets.token_hex(4)}"
    started = time.monotonic()
    seed_users(redis_url, prefix, s.salt, [(user, "oauth") for user in users])
    s.say(f"  {len(users):,} users seeded in {time.monotonic() - started:.1f} s")
    config = {**s.shared.config(shared_servers(s)), "redis_url": redis_url, "redis_prefix": prefix}
    kb, port = s.start_keybearer(name, config, PROXY_CPU)
    url = f"http://{HOST}:{port}/u0/oauth"
    wait_until(lambda: forwards_ok(url), kb, name)
    rotate = s.workdir / f"rotate-{name}.lua"
    rotate.write_text(WRK_LUA + ROTATE_LUA.format(users=len(users), server="oauth"))
    # The one-user row runs the same script over one user: wrk then does the same work
    # per request in both rows, on the core it shares with the upstream.
    single = s.workdir / f"single-{name}.lua"
    single.write_text(WRK_LUA + ROTATE_LUA.format(users=1, server="oauth"))
    return UsersProxy(kb, url, redis_proc, redis_url, rotate, single)


def section_users(s: Setup) -> None:
    """The OAuth path for one user and for many, round-robin, on one proxy: the many
    rarely repeat within a second, so they show what the token memory holds.

    The two rows alternate, in rounds, and each is the median of its rounds: the
    host's speed drifts by more than the difference measured, so one cell of each,
    one after the other, compares two moments rather than two workloads."""
    args = s.args
    users = [f"u{i}" for i in range(args.users)]
    p = start_users_proxy(s, "kb-users", users)
    kb, one_url, redis_url = p.kb, p.url, p.redis_url
    scripts = {"one": p.single, "many": p.rotate}
    # Long enough to reach every user once: the steady state.
    run_wrk(one_url, 16, args.warmup + 2 * math.ceil(len(users) / 2000), p.rotate, kb.pid, s.workdir)
    for level in args.users_connections:
        loads: dict[str, list[Load]] = {"one": [], "many": []}
        trips: dict[str, list[float]] = {"one": [], "many": []}
        for round_no in range(args.users_rounds):
            order = ("one", "many") if round_no % 2 == 0 else ("many", "one")
            for label in order:
                run_wrk(one_url, level, args.warmup, scripts[label], kb.pid, s.workdir)
                calls = redis_calls(redis_url)
                load = run_wrk(one_url, level, args.duration, scripts[label], kb.pid, s.workdir)
                trips[label].append((redis_calls(redis_url) - calls - 1) / max(load.requests, 1))
                loads[label].append(load)
                s.say(
                    f"  [5] round {round_no + 1} {label} c={level}: {load.rps:,.0f} req/s, "
                    f"{load.us_per_request or 0:.0f} us/req, {trips[label][-1]:.3f} Redis commands/req"
                )
        one = median_load(loads["one"])
        for label in ("one", "many"):
            load = median_load(loads[label])
            rounds = ", ".join(f"{x.rps:,.0f}" for x in loads[label])
            row = Row(
                "5",
                "oauth, 1 user" if label == "one" else f"oauth, {len(users):,} users round-robin",
                str(level),
                f"{load.rps:,.0f}",
                ms(load.p50_ms),
                ms(load.p99_ms),
                f"{load.rps / one.rps:.2f}" if one.rps else "-",
                pct(load.proxy_cpu),
                pct(load.load_cpu),
                f"{load.us_per_request:.0f}" if load.us_per_request else "-",
                detail=f"{max(trips[label]):.3f} Redis commands/request at most; rounds {rounds} req/s; "
                f"proxy RSS {rss_mb(tree(kb.pid)):.0f} MB",
            )
            if load.errors:
                row.detail += f"; {load.errors} errors"
            if label == "many":
                row.target = f">= {TARGET_MANY_USERS_RATIO:.2f}x 1 user"
                ok = load.rps >= TARGET_MANY_USERS_RATIO * one.rps and not load.errors
                row.result = verdict(ok, f"{load.rps / one.rps:.2f}x" if one.rps else "")
            s.rows.append(row)
    s.procs.stop(kb)
    s.procs.stop(p.redis)


def section_soak(s: Setup) -> None:
    """Traffic from many users for a while: the proxy's RSS must stay flat (every
    in-process cache is bounded). The slope is fitted over the samples after the
    first pass over every user."""
    args = s.args
    users = [f"u{i}" for i in range(args.users)]
    p = start_users_proxy(s, "kb-soak", users)
    run_wrk(p.url, 16, 5, p.rotate, p.kb.pid, s.workdir)  # every user once, at least
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    requests = 0
    while time.monotonic() - started < args.soak_seconds:
        load = run_wrk(p.url, 16, 10, p.rotate, p.kb.pid, s.workdir)
        requests += load.requests
        samples.append((time.monotonic() - started, rss_mb(tree(p.kb.pid))))
        s.say(f"  [soak] {samples[-1][0]:.0f} s: RSS {samples[-1][1]:.1f} MB, {load.rps:,.0f} req/s")
    slope = fitted_slope(samples) * 60
    s.rows.append(
        Row(
            "soak",
            f"RSS over {args.soak_seconds:.0f} s, {len(users):,} users",
            "16",
            target=f"slope <= {TARGET_SOAK_MB_PER_MIN} MB/min",
            result=verdict(slope <= TARGET_SOAK_MB_PER_MIN, f"{slope:+.2f} MB/min"),
            detail=f"{requests:,} requests; RSS {samples[0][1]:.1f} -> {samples[-1][1]:.1f} MB "
            f"({len(samples)} samples, 10 s apart)",
        )
    )
    s.procs.stop(p.kb)
    s.procs.stop(p.redis)


TARGET_SOAK_MB_PER_MIN = 1.0


def fitted_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


# --------------------------------------------------------------------------- 6. many servers

TARGET_SERVERS_RATIO = 1.10
STARTS = 5


def store_servers(
    database_url: str, servers: list[Any], salt: str = "", keys: dict[str, str] | None = None
) -> None:
    """Server definitions, and API keys sealed as `keybearer api-key set` seals them."""

    async def go() -> None:
        from proxy.crypto import Keyring
        from proxy.names import SecretKind
        from proxy.stores.postgres import PostgresStore

        store = PostgresStore(database_url)
        await store.open()
        try:
            await store.migrate()
            for server in servers:
                await store.put_server(server)
            for name, key in (keys or {}).items():
                sealed = Keyring(salt).encrypt(
                    SecretKind.API_KEY, key.encode(), f"{SecretKind.API_KEY}:{name}"
                )
                await store.set_secret(SecretKind.API_KEY, name, sealed)
        finally:
            await store.close()

    asyncio.run(go())


def section_servers(s: Setup) -> None:
    """The same requests with section 1's 5 servers, and with 1,000 servers (half in the config file,
    half in the store, every other stored one with its API key stored) and 100,000 stored connections."""
    assert s.shared is not None
    from proxy.settings import ServerConfig

    args = s.args
    up = s.upstream_base
    half = args.servers // 2
    redis_proc, redis_url = start_private_redis(s, "redis-servers")
    big = SharedStores(s.shared.admin_url, redis_url)
    try:
        big.create()
        # Stored: every other one an api_key server with its key in the store (each registered
        # for log redaction at start), the others oauth servers with the connections.
        stored = [ServerConfig(id=f"s{i}", url=f"{up}/mcp", auth="api_key" if i % 2 else "oauth",
                               client_id=None if i % 2 else "bench", source="store")
                  for i in range(args.servers - half)]  # fmt: skip
        keys = {
            server.id: f"stored-{secrets.token_urlsafe(24)}" for server in stored if server.auth == "api_key"
        }
        oauth = [server for server in stored if server.auth == "oauth"]
        users = max(1, args.connections_stored // len(oauth))
        started = time.monotonic()
        store_servers(big.database_url, stored, s.salt, keys)
        pairs = [(f"u{u}", server.id) for server in oauth for u in range(users)]
        seed_users(redis_url, big.prefix, s.salt, pairs)
        s.say(f"  [6] {len(stored)} servers ({len(keys)} with a stored API key) and {len(pairs):,} "
              f"connections stored in {time.monotonic() - started:.1f} s")  # fmt: skip
        small_servers = {**s.sidecar_config("x")["servers"], **shared_servers(s)}
        in_file = {f"f{i}": {"url": f"{up}/mcp", "auth": "api_key", "api_key_env": "BENCH_KEY"}
                   for i in range(half - len(small_servers))}  # fmt: skip
        setups = {
            f"{len(small_servers)} servers": (s.shared.config(small_servers), "alice"),
            f"{args.servers:,} servers, {len(pairs) // 1000}k conns": (
                big.config({**small_servers, **in_file}),
                "u0",
            ),
        }
        # Each started STARTS times, alternately, the median kept: one start on a shared machine
        # varied by more than the difference measured. The last start of each serves the load.
        # The CPU seconds a start took are compared too: they vary less than its wall time does.
        times: dict[str, list[float]] = {label: [] for label in setups}
        cpus: dict[str, list[float]] = {label: [] for label in setups}
        started_procs = {}
        for attempt in range(STARTS):
            for label, (config, _) in setups.items():
                name = "kb-servers-" + label.split()[0].replace(",", "")
                began = time.monotonic()
                proc, port = s.start_keybearer(name, config, PROXY_CPU)
                times[label].append(time.monotonic() - began)
                cpus[label].append(cpu_seconds(tree(proc.pid)))
                if attempt < STARTS - 1:
                    s.procs.stop(proc)
                    continue
                started_procs[label] = (proc, port, statistics.median(times[label]), rss_mb(tree(proc.pid)))
        start_cpu = {label: statistics.median(v) for label, v in cpus.items()}
        s.say("  [6] start-up wall (cpu) seconds: " + "; ".join(
            f"{k}: {', '.join(f'{t:.2f} ({c:.2f})' for t, c in zip(times[k], cpus[k], strict=True))}"
            for k in setups))  # fmt: skip
        seed_users(redis_url, big.prefix, s.salt, [("u0", "oauth")])
        # Two rounds, the second in the other order, each row the mean of its two: the machine's
        # drift between one cell and the next was as large as the ratio measured (1.00x-1.23x).
        rounds: dict[tuple[str, str], list[Load]] = {}
        for order in (list(started_procs), list(reversed(started_procs))):
            for path, server in (("api_key", "keyed"), ("oauth", "oauth")):
                for label in order:
                    proc, port, _, _ = started_procs[label]
                    url = f"http://{HOST}:{port}/{setups[label][1]}/{server}"
                    wait_until(lambda url=url: forwards_ok(url), proc, label)
                    run_wrk(url, 16, args.warmup, s.lua, proc.pid, s.workdir)
                    load = run_wrk(url, 16, args.duration, s.lua, proc.pid, s.workdir)
                    rounds.setdefault((label, path), []).append(load)
        loads = {key: median_load(both) for key, both in rounds.items()}
        s.say("  [6] us/req per round: " + "; ".join(
            f"{k[1]} {k[0].split()[0]}: {', '.join(f'{x.us_per_request or 0:.0f}' for x in v)}"
            for k, v in rounds.items()))  # fmt: skip
        small, large = setups
        for label, (proc, _, took, rss) in started_procs.items():
            rss_after = rss_mb(tree(proc.pid))
            for path in ("api_key", "oauth"):
                load = loads[(label, path)]
                base = loads[(small, path)]
                row = Row("6", f"{path}, {label}", "16", f"{load.rps:,.0f}", ms(load.p50_ms), ms(load.p99_ms),
                          f"{load.rps / base.rps:.2f}" if base.rps else "-", pct(load.proxy_cpu),
                          pct(load.load_cpu),
                          f"{load.us_per_request:.0f}" if load.us_per_request else "-")  # fmt: skip
                if label == large and load.us_per_request and base.us_per_request:
                    ratio = load.us_per_request / base.us_per_request
                    row.target = f"us/req <= {TARGET_SERVERS_RATIO:.2f}x"
                    row.result = verdict(ratio <= TARGET_SERVERS_RATIO and not load.errors, f"{ratio:.2f}x")
                s.rows.append(row)
            row = Row("6", f"start-up, {label}", detail=f"ready in {took:.2f} s, {start_cpu[label]:.2f} s of "
                      f"CPU (medians of {STARTS}); RSS {rss:.0f} MB at start, {rss_after:.0f} MB after the load")  # fmt: skip
            if label == large:
                _, _, small_took, small_rss = started_procs[small]
                row.target = f"<= {TARGET_SERVERS_RATIO:.2f}x {small}"
                cpu_ratio = start_cpu[label] / start_cpu[small]
                ok = cpu_ratio <= TARGET_SERVERS_RATIO and rss <= TARGET_SERVERS_RATIO * small_rss
                row.result = verdict(ok, f"{cpu_ratio:.2f}x CPU, {took / small_took:.2f}x time, "
                                     f"{rss / small_rss:.2f}x RSS")  # fmt: skip
            s.rows.append(row)
        for proc, _, _, _ in started_procs.values():
            s.procs.stop(proc)
    finally:
        big.drop()
        s.procs.stop(redis_proc)


# --------------------------------------------------------------------------- main


def machine_line() -> str:
    import platform

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = []
    for module in ("uvicorn", "uvloop", "httptools", "aiohttp", "starlette", "structlog", "redis", "asyncpg"):
        try:
            from importlib.metadata import version

            versions.append(f"{module} {version(module)}")
        except Exception:
            continue
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].split(" [")[0]
    nginx = (
        subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split(":")[-1].strip()
    )
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}; "
        + ", ".join(versions)
        + f"; {wrk}; {nginx}"
    )


def check_tools() -> None:
    missing = [t for t in ("wrk", "taskset", "nginx") if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; run tests/system-deps.sh bench (Debian: wrk, nginx-light)")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 CPUs: the proxy on CPU 0, the load and the upstream on CPU 1")


def benchmark(args: argparse.Namespace) -> int:
    check_tools()
    from services import POSTGRES_URL, REDIS_URL, unreachable

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keybearer-bench-") as tmp:
        workdir = Path(tempfile.mkdtemp(prefix="keybearer-bench-")) if args.keep else Path(tmp)
        if args.keep:
            print(f"logs and configs kept in {workdir}", file=sys.stderr)
        s = Setup(args, workdir, Processes(workdir))
        s.lua = workdir / "post.lua"
        s.lua.write_text(WRK_LUA)
        problems = unreachable() if not args.no_shared else ["--no-shared"]
        if problems:
            s.notes.append("OAuth rows and the refresh storm skipped: " + "; ".join(problems))
        else:
            s.shared = SharedStores(POSTGRES_URL, REDIS_URL)
        try:
            s.upstream_port = free_port()
            s.upstream = s.procs.start(
                "upstream", [sys.executable, PEERS, "upstream", "--port", str(s.upstream_port)], LOAD_CPU
            )
            wait_until(lambda: forwards_ok(f"{s.upstream_base}/mcp"), s.upstream, "upstream")
            if s.shared is not None:
                s.shared.create()
                seed_path = workdir / "seed.yaml"
                import yaml

                seed_path.write_text(
                    yaml.safe_dump({"listen": f"{HOST}:1", **s.shared.config(shared_servers(s))})
                )
                s.shared.seed(
                    seed_path,
                    s.salt,
                    [
                        {
                            "user": "alice",
                            "server": "oauth",
                            "access": "at-alice-" + secrets.token_urlsafe(16),
                            "refresh": "rt-alice",
                            "issuer": "http://127.0.0.1:9",
                            "expires_at": time.time() + 10 * 365 * 86400,
                        },
                    ],
                )
            if "1" in args.sections:
                s.say("[1] forwarding")
                section_forwarding(s)
            if "2" in args.sections:
                s.say("[2] event streams")
                # Holding this many streams is an operator's choice: the default cap is 1,000
                # connections per worker (docs/operations.md, "Connection limits").
                streams = {**s.sidecar_config("kb-streams"), "max_connections": args.streams + 100}
                kb, port = s.start_keybearer("kb-streams", streams, PROXY_CPU)
                section_streams(s, kb, port)
                s.procs.stop(kb)
            if "3" in args.sections and s.shared is not None:
                s.say("[3] refresh storm")
                section_storm(s)
                for _ in range(args.storm_runs):
                    section_storm_users(s)
            if "4" in args.sections:
                s.say("[4] workers")
                section_workers(s)
            if "5" in args.sections and s.shared is not None:
                s.say("[5] many users")
                section_users(s)
            if "6" in args.sections and s.shared is not None:
                s.say("[6] many servers")
                section_servers(s)
            if args.soak and s.shared is not None:
                s.say("[soak] RSS under many users")
                section_soak(s)
        finally:
            s.procs.stop_all()
            if s.shared is not None:
                s.shared.drop()
    print()
    print(f"Keybearer benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {time.monotonic() - started:.0f} s")
    print(f"machine: {machine_line()}")
    print(
        f"POST {len(REQUEST_BODY)} B -> {len(RESPONSE_BODY)} B JSON; wrk {args.warmup} s warm-up + "
        f"{args.duration} s per cell, {args.rounds} round(s); proxy on CPU {PROXY_CPU}, wrk + upstream on "
        f"CPU {LOAD_CPU}; 'vs floor' = req/s / the aiohttp floor's at the same clients; 'load cpu' = wrk's"
    )
    print()
    print(render_table(s.rows))
    for note in s.notes:
        print(f"note: {note}")
    failed = [r for r in s.rows if r.result.startswith("FAIL")]
    print()
    print(f"targets: {sum(1 for r in s.rows if r.result.startswith('PASS'))} PASS, {len(failed)} FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in s.rows], indent=2))
    return 0


def parse_compare(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not Path(path, "proxy").is_dir() or name.partition(":")[2] not in ("", "api_key", "oauth"):
        raise argparse.ArgumentTypeError("NAME[:api_key|:oauth]=PATH, where PATH holds a proxy/ package")
    return name, str(Path(path).resolve())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2 minutes in all)")
    parser.add_argument("-c", "--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("-d", "--duration", type=int, help="seconds per wrk cell (default 5, quick 2)")
    parser.add_argument("-w", "--warmup", type=int, help="warm-up seconds per cell (default 1)")
    parser.add_argument("-r", "--rounds", type=int, default=1, help="rounds of section 1 (median)")
    parser.add_argument("--sections", default="123456", help="which sections to run, e.g. 12")
    parser.add_argument("--no-traced", action="store_true", help="skip the traced api_key row")
    parser.add_argument("--no-asgi-floor", action="store_true", help="skip the raw ASGI (uvicorn) floor")
    parser.add_argument("--no-shared", action="store_true", help="skip PostgreSQL/Redis (OAuth, storm)")
    parser.add_argument("--sse-streams", type=int, default=10)
    parser.add_argument("--sse-interval-ms", type=float, default=20)
    parser.add_argument("--sse-seconds", type=float, help="seconds per SSE probe (default 5, quick 3)")
    parser.add_argument("--streams", type=int, default=5000, help="idle event streams held open")
    parser.add_argument("--idle-seconds", type=float, help="seconds the idle CPU is measured (default 5)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--storm", type=int, default=500, help="concurrent requests in the refresh storm")
    parser.add_argument("--storm-users", type=int, default=1000, help="users in the many-users storm")
    parser.add_argument(
        "--storm-runs", type=int, default=1, help="times the many-users storm is run (a row each)"
    )
    parser.add_argument("--token-delay-ms", type=float, default=50, help="the token endpoint's own delay")
    parser.add_argument("--worker-connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--users", type=int, default=10_000, help="distinct users in section 5")
    parser.add_argument("--users-connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--users-rounds", type=int, default=3, help="alternating rounds of section 5 (median)"
    )
    parser.add_argument("--servers", type=int, default=1000, help="servers in section 6")
    parser.add_argument("--soak", action="store_true", help="also: RSS under traffic from --users users")
    parser.add_argument("--soak-seconds", type=float, default=60, help="length of --soak (600: ten minutes)")
    parser.add_argument("--connections-stored", type=int, default=100_000, help="connections in section 6")
    parser.add_argument(
        "--compare",
        type=parse_compare,
        action="append",
        default=[],
        metavar="NAME[:api_key|:oauth]=PATH",
        help="section 1 also runs a scratch copy of the proxy (PATH/proxy): its api_key and oauth "
        "rows, or only the one named after NAME:",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    parser.add_argument(
        "--source",
        type=lambda p: parse_compare(f"x={p}")[1],
        metavar="PATH",
        help="run every Keybearer from a scratch copy (PATH/proxy) instead",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--profile", action="store_true", help="profile the proxy with py-spy instead")
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--profile-connections", type=int, default=16)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1
    if args.sse_seconds is None:
        args.sse_seconds = 3 if args.quick else 5
    if args.idle_seconds is None:
        args.idle_seconds = 3 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        from hotspots import profile

        return profile(args)
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
