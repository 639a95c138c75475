"""proxy/logs.py: what reaches the log stream, when, and what never does."""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from support import ROOT

from proxy import logs
from proxy.crypto import Keyring
from proxy.names import SecretKind
from proxy.registry import Registry
from proxy.sealed import SealedSecrets
from proxy.stores.sqlite import SQLiteStore


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("info", out)
    yield out
    logs.configure("info")


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_secrets_are_masked_by_key_by_pattern_and_by_value(stream: io.StringIO) -> None:
    logs.register_secret("sk-registered-123456")
    log = structlog.get_logger("test")
    log.info(
        "call",
        client_secret="s3cr3t-value",
        headers={"Authorization": "Basic dXNlcjpwYXNz", "accept": "application/json"},
        note="retrying with Bearer eyJhbGciOi.payload.sig now",
        detail=["the key sk-registered-123456 was refused"],
        server="github",
    )
    (line,) = lines(stream)
    text = stream.getvalue()
    for secret in ("s3cr3t-value", "dXNlcjpwYXNz", "eyJhbGciOi", "sk-registered-123456"):
        assert secret not in text
    assert line["client_secret"] == logs.REDACTED
    assert line["headers"] == {"Authorization": logs.REDACTED, "accept": "application/json"}
    assert line["note"] == f"retrying with Bearer {logs.REDACTED} now"
    assert line["server"] == "github" and line["level"] == "info"


def test_request_line_has_the_common_shape_and_redacts_the_agents_text(stream: io.StringIO) -> None:
    logs.request(request_id="r1", user="alice", server="gh", method="POST",
                 mcp_method="tools/call Bearer abcdefghijkl", status=200, duration_ms=1.5)  # fmt: skip
    (line,) = lines(stream)
    assert line["event"] == "request" and line["level"] == "info"
    assert str(line["timestamp"]).endswith("Z")
    assert line["mcp_method"] == f"tools/call Bearer {logs.REDACTED}"
    assert (line["user"], line["status"], line["duration_ms"]) == ("alice", 200, 1.5)


def test_request_line_fields_and_timestamp(stream: io.StringIO) -> None:
    secret = f"sk-{secrets.token_hex(8)}"
    logs.register_secret(secret)
    before = datetime.now(UTC)
    logs.request(request_id="r2", method="POST", mcp_method=secret, status=503, outcome="upstream_timeout",
                 duration_ms=12.05, bytes_in=7, bytes_out=1234)  # fmt: skip
    logs.request(request_id="r3", mcp_method="x/y", status=200)  # shorter than any secret
    first, second = lines(stream)
    assert first["mcp_method"] == logs.REDACTED and second["mcp_method"] == "x/y"
    assert (first["status"], first["duration_ms"], first["bytes_in"], first["bytes_out"]) == (
        503,
        12.05,
        7,
        1234,
    )
    assert (first["user"], first["server"], first["outcome"]) == (None, None, "upstream_timeout")
    stamp = str(first["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= when <= datetime.now(UTC)


def test_request_lines_follow_the_level() -> None:
    out = io.StringIO()
    logs.configure("warning", out)
    try:
        logs.request(request_id="r1", status=200)
        structlog.get_logger("test").warning("kept")
    finally:
        logs.configure("info")
    assert [line["event"] for line in lines(out)] == ["kept"]


async def test_request_lines_wait_for_a_batch_and_other_lines_keep_their_order() -> None:
    out = io.StringIO()
    logs.configure("info", out, flush_interval=0.05)
    try:
        for i in range(3):
            logs.request(request_id=f"r{i}", status=200)
        assert out.getvalue() == ""  # waiting for the batch
        await asyncio.sleep(0.2)
        assert [line["request_id"] for line in lines(out)] == ["r0", "r1", "r2"]
        logs.request(request_id="r3", status=200)
        structlog.get_logger("test").warning("at once")  # takes the waiting line with it
        assert [line.get("request_id", line["event"]) for line in lines(out)][3:] == ["r3", "at once"]
    finally:
        logs.configure("info")


def test_waiting_lines_are_written_when_the_process_exits() -> None:
    program = (
        "import asyncio\n"
        "from proxy import logs\n"
        "async def main():\n"
        "    logs.configure('info', flush_interval=30)\n"
        "    logs.request(request_id='last-words', status=200)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["request_id"] == "last-words"


def test_many_registered_secrets_are_each_masked_whole(stream: io.StringIO) -> None:
    run = secrets.token_hex(4)
    many = [f"sk-{run}-{i:04d}-{secrets.token_urlsafe(12)}" for i in range(1000)]
    # One a prefix of another (the longer is masked whole), and regex metacharacters.
    short, longer, odd = f"pre{run}fix", f"pre{run}fix-and-more", f"a.b*c+({run})?[x]|y\\z"
    logs.register_secrets([*many, short, longer, odd, None, "tiny"])
    structlog.get_logger("test").warning(
        "refused",
        detail=f"keys {many[0]} and {many[999]}, then {longer} and {short}! also {odd}.",
        near=f"{many[5][:-1]} is not a key, nor is {short[1:]}",
        tiny="tiny",
    )
    (line,) = lines(stream)
    assert (
        line["detail"] == "keys [REDACTED] and [REDACTED], then [REDACTED] and [REDACTED]! also [REDACTED]."
    )
    assert line["near"] == f"{many[5][:-1]} is not a key, nor is {short[1:]}"
    assert line["tiny"] == "tiny"  # under 6 characters: never registered


async def test_stored_api_keys_are_registered_with_one_pattern_build(
    tmp_path: Path, salt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(tmp_path / "keys.db"))
    await store.open()
    await store.migrate()
    keyring = Keyring(salt)
    keys = {f"s{i}": f"stored-{secrets.token_urlsafe(16)}" for i in range(300)}
    for name, key in keys.items():  # sealed as SealedSecrets.put does, without registering them
        await store.set_secret(
            SecretKind.API_KEY, name, keyring.encrypt(SecretKind.API_KEY, key.encode(), f"api_key:{name}")
        )
    builds = []
    trie = logs._trie
    monkeypatch.setattr(logs, "_trie", lambda values: builds.append(1) or trie(values))
    try:
        await Registry({}, store, SealedSecrets(store, keyring)).load()
    finally:
        await store.close()
    assert len(builds) == 1  # before: one build of the whole pattern per key, 300 here
    assert logs.redact_text(f"{keys['s0']} {keys['s299']}") == "[REDACTED] [REDACTED]"
