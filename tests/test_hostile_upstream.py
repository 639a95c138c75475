"""A hostile upstream (tests/peers/hostile_upstream.py) behind a real `keybearer serve`:
what the agent sees, and what it costs the proxy process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from peers.hostile_upstream import OK_BODY, HostileUpstream
from support import ProxyProcess

# Each server id is the peer's mode of the same name.
MODES = [
    "ok", "endless-headers", "endless-header-value", "interim-flood", "trailing-bytes",
    "cut-chunked", "cut-event-stream", "short-length",
]  # fmt: skip
# What the proxy may grow by while it refuses a 64 MiB head. Buffering it would cost more than that.
RSS_GROWTH_LIMIT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
async def peer() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream() as hostile:
        yield hostile


@pytest.fixture(scope="module")
def proxy(
    peer: HostileUpstream, tmp_path_factory: pytest.TempPathFactory, salt: str
) -> Iterator[ProxyProcess]:
    servers = {mode: {"url": peer.url(mode), "auth": "none"} for mode in MODES}
    # A timeout well above what any test here waits: an answer that takes it is a failure.
    proc = ProxyProcess(
        {"servers": servers, "upstream_timeout": 20},
        tmp_path_factory.mktemp("proxy"),
        {"KEYBEARER_SALT": salt},
    )
    yield proc
    proc.stop()


def memory(pid: int, field: str) -> int:
    """A Vm* line of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


@pytest.mark.parametrize("mode", ["endless-headers", "endless-header-value", "interim-flood"])
async def test_an_endless_head_is_a_502_and_the_proxy_does_not_grow(
    proxy: ProxyProcess, peer: HostileUpstream, mode: str
) -> None:
    assert proxy.proc is not None
    pid = proxy.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    before = memory(pid, "VmRSS")
    async with httpx.AsyncClient(timeout=15) as client:
        answer = await client.post(f"{proxy.url}/alice/{mode}", json={"hello": "upstream"})
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_invalid_response"
    assert ("KiB of headers" if mode.startswith("endless") else "interim answers") in answer.json()["message"]
    assert memory(pid, "VmHWM") - before < RSS_GROWTH_LIMIT


async def test_bytes_after_an_answer_never_reach_the_agent(
    proxy: ProxyProcess, peer: HostileUpstream
) -> None:
    connections = peer.connections
    async with httpx.AsyncClient(timeout=15) as client:
        answer = await client.post(f"{proxy.url}/alice/trailing-bytes", json={})
        assert answer.status_code == 200
        assert answer.headers.get_list("content-length") == [str(len(OK_BODY))]
        assert answer.content == OK_BODY
        # The next request to that origin goes out on a connection of its own.
        assert (await client.post(f"{proxy.url}/alice/ok", json={})).content == OK_BODY
    assert peer.connections == connections + 2


@pytest.mark.parametrize("mode", ["cut-chunked", "cut-event-stream", "short-length"])
async def test_a_body_cut_short_upstream_is_cut_short_for_the_agent(proxy: ProxyProcess, mode: str) -> None:
    async with (
        httpx.AsyncClient(timeout=15) as client,
        client.stream("POST", f"{proxy.url}/alice/{mode}", json={}) as answer,
    ):
        assert answer.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await answer.aread()
