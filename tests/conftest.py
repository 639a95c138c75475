"""Shared fixtures: real services, a fresh database and key prefix per run, real processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import POSTGRES_URL, REDIS_URL, unreachable
from support import ProxyProcess, free_port, self_signed_certificate, wait_for_port

# Its fixtures are a plugin (below), and this module imports it first.
pytest.register_assert_rewrite("peers.private_stores")
from peers.private_stores import RedisServer  # noqa: E402

# Private Redis and PostgreSQL servers, for tests that break them.
pytest_plugins = ["peers.private_stores"]


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = unreachable()
    if problems:
        pytest.exit("\n".join(problems), returncode=3)


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
def salt() -> str:
    return secrets.token_urlsafe(48)


@pytest.fixture
async def proxy_factory(tmp_path: Path, salt: str) -> AsyncIterator[type[ProxyProcess]]:
    started: list[ProxyProcess] = []

    class Factory(ProxyProcess):
        def __init__(self, config: dict, env: dict[str, str] | None = None, **kw) -> None:
            super().__init__(config, tmp_path, {"KEYBEARER_SALT": salt, **(env or {})}, **kw)
            started.append(self)

    yield Factory
    # Stopped together, off the loop: peers served on this loop (an OTLP collector, an
    # authorization server) must go on answering while a proxy shuts down.
    await asyncio.gather(*(asyncio.to_thread(proc.stop) for proc in started))


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, driven by Playwright: one for the run (launching it took about
    0.6 s per module); every test opens its own context, with no cookies or storage."""
    from peers.browser import launch_browser

    async with launch_browser() as b:
        yield b


@pytest.fixture(scope="session")
async def postgres_database(run_id: str) -> AsyncIterator[str]:
    """A database of its own for this run, dropped after."""
    import asyncpg

    name = f"keybearer_test_{run_id}"
    admin = await asyncpg.connect(POSTGRES_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def redis_prefix(run_id: str) -> AsyncIterator[str]:
    """A key prefix of its own for this run; its keys are deleted after."""
    import redis.asyncio as redis

    prefix = f"kbtest-{run_id}"
    client = redis.from_url(REDIS_URL)
    try:
        yield prefix
    finally:
        async for key in client.scan_iter(match=f"{prefix}*"):
            await client.delete(key)
        await client.aclose()


@pytest.fixture(scope="session")
def redis_sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private master and one Sentinel watching it; a redis+sentinel:// URL for them."""
    root = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(root / "master").start()
    port = free_port()
    conf = root / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {root}\n"
        f"sentinel monitor kbmaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds kbmaster 2000\n"
    )
    log = (root / "sentinel.log").open("ab")
    sentinel = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, sentinel)
        yield f"redis+sentinel://127.0.0.1:{port}/kbmaster/0"
    finally:
        sentinel.kill()
        sentinel.wait()
        master.kill()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private three-master Redis Cluster; a redis+cluster:// URL for it."""
    root = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for i in range(3):
            # The bus port is set explicitly: port + 10000 may not exist.
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000", "--cluster-port", str(free_port())]  # fmt: skip
            nodes.append(RedisServer(root / f"node{i}", args).start())
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in n.cli("cluster", "info") for n in nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the private Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture(scope="session")
def redis_tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis speaking only TLS, with a self-signed certificate for 127.0.0.1."""
    root = tmp_path_factory.mktemp("redis-tls")
    cert, key = self_signed_certificate(root)
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
    server = RedisServer(root / "server", args, port=port).start()
    try:
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    finally:
        server.kill()


__all__ = ["REDIS_URL", "RedisServer", "free_port", "os"]
