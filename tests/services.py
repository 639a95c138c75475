"""Check that the services the tests need are reachable; one line each if not.

Run by `make test` before pytest, and by tests/conftest.py, so that a machine
without PostgreSQL or Redis says so once instead of failing a hundred tests.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

HOW_TO_START = {
    "PostgreSQL": "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
    "(or set TEST_POSTGRES_URL)",
    "Redis": "start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' "
    "(or set TEST_REDIS_URL)",
}


def unreachable() -> list[str]:
    problems = []
    for name, url, default_port in (("PostgreSQL", POSTGRES_URL, 5432), ("Redis", REDIS_URL, 6379)):
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or default_port
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError as exc:
            problems.append(
                f"{name} is not reachable at {host}:{port} ({exc.strerror or exc}); {HOW_TO_START[name]}"
            )
    return problems


if __name__ == "__main__":
    found = unreachable()
    for line in found:
        print(line, file=sys.stderr)
    sys.exit(1 if found else 0)
