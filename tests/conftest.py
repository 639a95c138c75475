"""Shared fixtures: real services, a fresh database and key prefix per run, real processes."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import POSTGRES_URL, REDIS_URL, unreachable
from support import ProxyProcess, free_port


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
def proxy_factory(tmp_path: Path, salt: str) -> Iterator[type[ProxyProcess]]:
    started: list[ProxyProcess] = []

    class Factory(ProxyProcess):
        def __init__(self, config: dict, env: dict[str, str] | None = None, **kw) -> None:
            super().__init__(config, tmp_path, {"KEYBEARER_SALT": salt, **(env or {})}, **kw)
            started.append(self)

    yield Factory
    for proc in started:
        proc.stop()


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


__all__ = ["REDIS_URL", "free_port", "os"]
