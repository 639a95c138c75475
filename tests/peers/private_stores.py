"""Private redis-server and PostgreSQL instances for tests that break them.

Never inject faults into the machine's shared 127.0.0.1:6379 / 5432: other
tests (and other people) use them. These start a server of their own on a
free port, in a temporary directory, and can:

    start()     start (again: same port, same data directory)
    stop()      stop cleanly (Redis: SIGTERM; PostgreSQL: pg_ctl -m fast)
    kill()      die at once (Redis: SIGKILL; PostgreSQL: pg_ctl -m immediate, a crash)
    freeze()    SIGSTOP every process: connections stay open, nothing answers (a hung server)
    thaw()      SIGCONT them
    frozen()    a context manager: freeze(), then thaw() on the way out

Fixtures (registered in tests/conftest.py through `pytest_plugins`):

    redis_server_factory(args=[...], persistent=False)  -> RedisServer, started; killed after the test
    postgres_server_factory()                            -> PostgresServer, started; removed after the test
    private_postgres                                     -> one PostgresServer for the test module
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from support import free_port, wait_for_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))


class RedisServer:
    """A private `redis-server` on a free loopback port.

    `persistent=True` turns the append-only file on, so that a restart (after
    stop() or kill()) finds what was written; otherwise a restart is empty.
    """

    def __init__(
        self, workdir: Path, args: Sequence[str] = (), port: int | None = None, persistent: bool = False
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        log = (self.workdir / "redis.log").open("ab")
        appendonly = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *appendonly, "--dir", str(self.workdir), *self.args],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )  # fmt: skip
        wait_for_port(self.port, self.proc)
        return self

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc and self.proc.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def freeze(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
        self._frozen = False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout


class PostgresServer:
    """A private PostgreSQL cluster in a temporary directory, trust authentication,
    run as the `postgres` OS user when the tests run as root (initdb refuses root)."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="kb-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._frozen: list[int] = []

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def _run(self, *cmd: str) -> str:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, timeout=60)
        return done.stdout

    def init(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "log"), "-w", "start")  # fmt: skip
        wait_for_port(self.port)
        return self

    def restart(self) -> PostgresServer:
        self.stop()
        return self.start()

    def stop(self) -> None:
        self._pg_ctl_stop("fast")

    def kill(self) -> None:
        # Immediate mode: what a crash or an OOM-killed server looks like to clients.
        self._pg_ctl_stop("immediate")

    crash = kill

    def _pg_ctl_stop(self, mode: str) -> None:
        if self.running:
            self.thaw()
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                         "-d", database, "-XAtqc", sql)  # fmt: skip

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def _postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def freeze(self) -> None:
        """SIGSTOP the postmaster first (it then starts no new backend), then every child."""
        postmaster = self._postmaster()
        os.kill(postmaster, signal.SIGSTOP)
        self._frozen = [postmaster, *_children(postmaster)]
        for pid in self._frozen[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in reversed(self._frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def remove(self) -> None:
        if self.running:
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid …: comm may hold spaces, so split after its ')'.
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
    return found


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers (`factory(args=[...])`); all are killed after the test."""
    started: list[RedisServer] = []

    def factory(args: Sequence[str] = (), name: str | None = None, persistent: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / (name or f"redis-{len(started)}"), args, persistent=persistent)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.kill()


@pytest.fixture
def postgres_server_factory() -> Iterator[Callable[[], PostgresServer]]:
    """Start private PostgreSQL clusters; all are removed after the test."""
    started: list[PostgresServer] = []

    def factory() -> PostgresServer:
        server = PostgresServer()
        started.append(server)
        return server.init().start()

    yield factory
    for server in started:
        server.remove()


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL cluster for a test module; found running by each test."""
    server = PostgresServer().init().start()
    try:
        yield server
    finally:
        server.remove()
