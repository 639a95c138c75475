"""Starting real processes on loopback for tests: the proxy as its image runs it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class ProxyProcess:
    """`keybearer serve --config FILE` in a subprocess, its log captured to a file."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        env: dict[str, str],
        *,
        port: int | None = None,
        start: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.config = {
            "listen": f"127.0.0.1:{self.port}",
            "public_url": f"http://127.0.0.1:{self.port}",
            "database_url": f"sqlite:///{workdir}/keybearer.db",
            **config,
        }
        self.config_path = workdir / f"config-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / f"proxy-{self.port}.log"
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *args, "--config", str(self.config_path)],
            input=input, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=60,
        )  # fmt: skip

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
        )  # fmt: skip
        try:
            wait_for_port(self.port, self.proc)
            httpx.get(self.url + "/ping", timeout=5).raise_for_status()
        except BaseException:
            self.stop()
            raise RuntimeError(f"proxy did not start; log:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def self_signed_certificate(folder: Path, names: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and the host `names`) that is its own CA, and its key,
    as PEM files in folder."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keybearer test 127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), *(x509.DNSName(n) for n in names)]
            ),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "loopback.crt", folder / "loopback.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def start_all(procs: list[ProxyProcess]) -> list[ProxyProcess]:
    """Start processes made with start=False all at once: a start is mostly the
    interpreter importing, which one after the other cost each replica set a second
    or more. A failed start stops its process and is raised once all have tried."""
    with ThreadPoolExecutor(len(procs)) as pool:
        list(pool.map(ProxyProcess.start, procs))
    return procs


def stop_all(procs: list[ProxyProcess]) -> None:
    """Stop them all at once: each waits for its own graceful shutdown."""
    if procs:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(ProxyProcess.stop, procs))


@contextlib.contextmanager
def replicas_running(
    config: dict[str, Any], ports: list[int], env: dict[str, str], workdirs: Any
) -> Iterator[list[ProxyProcess]]:
    """One proxy per port on one config and environment, each in its own work folder
    (`workdirs` is pytest's TempPathFactory), started together; all are stopped after,
    even if one fails to start."""
    procs = [
        ProxyProcess(config, workdirs.mktemp(f"replica-{port}"), env, port=port, start=False)
        for port in ports
    ]
    try:
        yield start_all(procs)
    finally:
        stop_all(procs)
