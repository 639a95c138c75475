"""Peer subprocesses that print `READY <port> [<more>]` on stdout once they serve:
waiting for that line, draining what follows, and stopping them."""

from __future__ import annotations

import contextlib
import select
import subprocess
import threading
import time
from pathlib import Path


def wait_ready(proc: subprocess.Popen[str], timeout: float) -> list[str]:
    """The words after READY; RuntimeError if the process exits first, TimeoutError if slow."""
    assert proc.stdout is not None
    name = Path(str(proc.args[1])).name if isinstance(proc.args, list) else "peer"  # type: ignore[index]
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before READY; stdout: {seen}")
        readable, _, _ = select.select([proc.stdout], [], [], 0.1)
        if readable:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return line.split()[1:]
            if line:
                seen.append(line.rstrip())
    raise TimeoutError(f"{name} not READY after {timeout}s; stdout: {seen}")


def drain(proc: subprocess.Popen[str], sink: list[str]) -> None:
    """Keep reading stdout into `sink`, so that a chatty peer never blocks on a full pipe."""

    def run() -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed on shutdown
            for line in proc.stdout:
                sink.append(line.rstrip())

    threading.Thread(target=run, daemon=True).start()


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 5 s; pipes closed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
