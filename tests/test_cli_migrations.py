"""Only `keybearer migrate` changes a shared schema; every other command refuses a
schema this version does not match, and says what to run.

A fresh PostgreSQL database per test, on the machine's server (nothing here
breaks it). The embedded SQLite store migrates itself, but refuses a newer schema too.
"""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from services import POSTGRES_URL, REDIS_URL
from support import ROOT, ProxyProcess

from proxy.stores.base import migrations

FUTURE = "9999_from_a_newer_version"
KNOWN = [version for version, _ in migrations("postgres")]


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    name = f"keybearer_cli_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(POSTGRES_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def keybearer(database_url: str, tmp_path: Path, salt: str, redis_prefix: str) -> Iterator[ProxyProcess]:
    config = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "redis_prefix": f"{redis_prefix}-cli-{secrets.token_hex(3)}",
        "servers": {"keyed": {"url": "https://keyed.example/mcp", "auth": "api_key"}},
    }
    proc = ProxyProcess(config, tmp_path, {"KEYBEARER_SALT": salt}, start=False)
    yield proc
    proc.stop()


async def tables(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
    finally:
        await conn.close()
    return [r["tablename"] for r in rows]


async def applied(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [
            r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        ]
    finally:
        await conn.close()


def refused(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("keybearer: failed: ") and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def serve(proc: ProxyProcess) -> subprocess.CompletedProcess[str]:
    """`keybearer serve` expected to stop before it listens."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(proc.config_path)],
        capture_output=True, text=True, env=proc.env, cwd=ROOT, timeout=60,
    )  # fmt: skip


async def test_commands_on_an_unmigrated_database_refuse_and_migrate_nothing(
    keybearer: ProxyProcess, database_url: str
) -> None:
    for command in (["api-key", "set", "keyed"], ["servers", "list"], ["keys", "rotate"]):
        result = keybearer.cli(*command, input="sk-never-stored-0011\n")
        refused(result, "run `keybearer migrate`")
        assert f"{len(KNOWN)} migration(s) pending ({', '.join(KNOWN)})" in result.stderr
    assert await tables(database_url) == []

    # `serve` without migrate_on_start, likewise, before it listens.
    refused(serve(keybearer), "run `keybearer migrate`")
    assert await tables(database_url) == []


async def test_migrate_prints_what_it_applied_then_up_to_date(
    keybearer: ProxyProcess, database_url: str
) -> None:
    first = keybearer.cli("migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"applied {len(KNOWN)} migration(s): {', '.join(KNOWN)}"
    again = keybearer.cli("migrate", "--json")
    assert again.returncode == 0, again.stderr
    assert '"applied": []' in again.stdout
    assert keybearer.cli("migrate").stdout.strip() == "database schema is up to date"
    assert await applied(database_url) == KNOWN

    stored = keybearer.cli("api-key", "set", "keyed", input="sk-stored-after-migrate-0011\n")
    assert stored.returncode == 0, stored.stderr
    keybearer.start()  # serves on the migrated schema without migrating it
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(keybearer.url + "/ready")).status_code == 200


async def test_a_schema_from_a_newer_version_makes_commands_refuse(
    keybearer: ProxyProcess, database_url: str
) -> None:
    assert keybearer.cli("migrate").returncode == 0
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", FUTURE)
    finally:
        await conn.close()

    for command in (["servers", "list"], ["api-key", "set", "keyed"], ["migrate"]):
        result = keybearer.cli(*command, input="sk-never-stored-0011\n")
        refused(result, f"the database schema is newer than this keybearer: it has migration(s) {FUTURE}")
    assert await applied(database_url) == sorted([*KNOWN, FUTURE])

    # A replica of the previous version keeps serving during a rolling update.
    keybearer.start()
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(keybearer.url + "/ready")).status_code == 200
    assert "the database schema is newer than this version" in keybearer.log()


def test_a_newer_sqlite_schema_makes_commands_refuse(tmp_path: Path, salt: str) -> None:
    proc = ProxyProcess({}, tmp_path, {"KEYBEARER_SALT": salt}, start=False)
    assert proc.cli("servers", "list").returncode == 0  # the embedded store migrates itself
    path = proc.config["database_url"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (FUTURE,))
    refused(proc.cli("servers", "list"), "newer than this keybearer")
