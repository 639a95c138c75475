"""The forwarder's lane (forwarding.py `forward_now`, serving.py) against a raw
upstream (tests/peers/hostile_upstream.py) behind a real `keybearer serve`.

Each test runs twice: with the lane, and with traces on, which sends every
request the ASGI way (a task per request). The agent must see the same thing
either way; the one difference allowed, a chunked answer relayed with a length
by the lane, shows which way a run went.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from peers.hostile_upstream import BIG_BYTES, OK_BODY, SLOW_BODY, HostileUpstream
from support import ProxyProcess

KEY = "lane-key-5c1d0e9f8a7b"
MODES = ["ok", "slow-ok", "split", "chunked", "silent", "big", "refuse"]
RPC = {"jsonrpc": "2.0", "id": 41, "method": "tools/list"}


@pytest.fixture(scope="module")
async def peer() -> Iterator[HostileUpstream]:  # type: ignore[misc]
    async with HostileUpstream() as hostile:
        yield hostile


@pytest.fixture(scope="module", params=["lane", "task"])
async def proxy(
    request: pytest.FixtureRequest, peer: HostileUpstream, tmp_path_factory: pytest.TempPathFactory, salt: str
) -> AsyncIterator[ProxyProcess]:
    servers = {mode: {"url": peer.url(mode), "auth": "api_key", "api_key_env": "LANE_KEY"} for mode in MODES}
    env = {"KEYBEARER_SALT": salt, "LANE_KEY": KEY}
    if request.param == "task":
        env |= {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": peer.url("collector"), "OTEL_BSP_SCHEDULE_DELAY": "50"}
    proc = ProxyProcess({"servers": servers, "upstream_timeout": 1}, tmp_path_factory.mktemp("proxy"), env)
    proc.way = request.param  # type: ignore[attr-defined]
    yield proc
    # Off this loop: the peer, on it, is the traced proxy's collector, which gets its last
    # spans at shutdown (a blocked loop held every traced stop to its 10 s kill).
    await asyncio.to_thread(proc.stop)
    assert KEY not in proc.log()


async def post(proxy: ProxyProcess, server: str, **kw: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        # The first request to an upstream goes the ASGI way (it opens the connection the lane reuses).
        await client.post(f"{proxy.url}/alice/ok", json=RPC)
        return await client.post(f"{proxy.url}/alice/{server}", json=RPC, **kw)  # type: ignore[arg-type]


async def test_an_answer_whose_body_comes_later_is_waited_for(proxy: ProxyProcess) -> None:
    answer = await post(proxy, "split")
    assert answer.status_code == 200 and answer.content == OK_BODY
    assert answer.headers["content-length"] == str(len(OK_BODY))


async def test_a_chunked_answer_arrives_whole(proxy: ProxyProcess) -> None:
    answer = await post(proxy, "chunked")
    assert answer.status_code == 200 and answer.content == OK_BODY
    if proxy.way == "lane":  # type: ignore[attr-defined]
        assert answer.headers["content-length"] == str(len(OK_BODY))
        assert "transfer-encoding" not in answer.headers
    else:
        assert answer.headers["transfer-encoding"] == "chunked"


async def test_an_upstream_that_never_answers_is_a_504(proxy: ProxyProcess) -> None:
    answer = await post(proxy, "silent")
    assert answer.status_code == 504
    body = answer.json()
    assert body["id"] == 41 and body["error"]["data"] == {"error": "upstream_timeout", "server": "silent"}


async def test_a_long_answer_is_relayed_whole(proxy: ProxyProcess) -> None:
    answer = await post(proxy, "big")
    assert answer.status_code == 200 and len(answer.content) == BIG_BYTES
    assert json.loads(answer.content)["pad"] == "p" * (BIG_BYTES - 10)


async def test_a_refused_key_is_explained(proxy: ProxyProcess) -> None:
    answer = await post(proxy, "refuse")
    assert answer.status_code == 502
    body = answer.json()
    assert body["id"] == 41 and body["error"]["data"] == {
        "error": "upstream_unauthorized",
        "server": "refuse",
    }
    assert "www-authenticate" not in answer.headers


def raw_request(proxy: ProxyProcess, server: str, *extra: bytes) -> bytes:
    body = json.dumps(RPC).encode()
    return b"\r\n".join(
        [
            f"POST /alice/{server} HTTP/1.1".encode(),
            f"host: 127.0.0.1:{proxy.port}".encode(),
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            *extra,
            b"",
            body,
        ]
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def test_pipelined_requests_are_answered_in_order(proxy: ProxyProcess) -> None:
    await post(proxy, "ok")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        # The slow one first, in the same write: its answer must still come first.
        writer.write(raw_request(proxy, "slow-ok") + raw_request(proxy, "ok"))
        first = await asyncio.wait_for(read_answer(reader), 10)
        second = await asyncio.wait_for(read_answer(reader), 10)
    finally:
        writer.close()
    assert first[0].startswith(b"HTTP/1.1 200") and first[1] == SLOW_BODY
    assert second[0].startswith(b"HTTP/1.1 200") and second[1] == OK_BODY


async def test_connection_close_is_honoured(proxy: ProxyProcess) -> None:
    await post(proxy, "ok")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(raw_request(proxy, "ok", b"connection: close"))
        head, body = await asyncio.wait_for(read_answer(reader), 10)
        assert b"\r\nconnection: close\r\n" in head.lower() and body == OK_BODY
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after the answer
    finally:
        writer.close()


async def test_an_agent_gone_before_its_answer_leaves_the_others_theirs(proxy: ProxyProcess) -> None:
    await post(proxy, "ok")
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(raw_request(proxy, "slow-ok"))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    # Its late answer must not reach anyone else; the proxy goes on serving.
    answers = await asyncio.gather(*(post(proxy, "ok") for _ in range(4)))
    await asyncio.sleep(0.4)
    assert [a.content for a in answers] == [OK_BODY] * 4
    assert (await post(proxy, "slow-ok")).content == SLOW_BODY
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    assert any(line.get("server") == "slow-ok" and line.get("status") == 200 for line in lines)


def collected_by_gc(metrics: str) -> float:
    """Objects the cycle collector freed so far (prometheus_client's GC collector)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("python_gc_objects_collected_total{")
    )


async def test_an_answered_request_leaves_no_garbage_for_the_cycle_collector(proxy: ProxyProcess) -> None:
    # What a request leaves in a reference cycle outlives it until a collection finds it, and
    # under load those collections cost the proxy a tenth of its CPU (docs/performance.md).
    requests = 400
    async with httpx.AsyncClient(timeout=10) as client:
        await client.post(f"{proxy.url}/alice/ok", json=RPC)
        before = collected_by_gc((await client.get(f"{proxy.url}/metrics")).text)
        for _ in range(requests):
            assert (await client.post(f"{proxy.url}/alice/ok", json=RPC)).content == OK_BODY
        after = collected_by_gc((await client.get(f"{proxy.url}/metrics")).text)
    assert after - before < requests / 4
