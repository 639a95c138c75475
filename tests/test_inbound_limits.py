"""Limits on inbound connections before any caller is authenticated: the size of
a request head, the time it may take to arrive, and the number of open
connections. Each test runs `keybearer serve` and talks to it over raw loopback
sockets, the way an abusive client would, or over http.client and httpx, the
way a well-behaved one does.
"""

from __future__ import annotations

import contextlib
import json
import select
import selectors
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from http.client import HTTPConnection
from pathlib import Path

import httpx
import pytest
from peers.mcp_client import Upstream, run_upstream
from support import ProxyProcess

from proxy.settings import ConfigError, load_settings

MiB = 1024 * 1024
USER = "alice"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with run_upstream("streamable-http") as up:
        yield up


def connect(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """All the proxy sends until it closes the connection; fails if it is still open after `timeout`."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"still open after {timeout} s, having sent {received[:300]!r}") from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def get(conn: HTTPConnection, path: str = "/ping") -> int:
    conn.request("GET", path)
    answer = conn.getresponse()
    answer.read()
    return answer.status


def log_events(proxy: ProxyProcess, event: str) -> list[dict[str, object]]:
    time.sleep(0.3)  # log lines go out in batches every 0.1 s
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def test_a_head_over_the_limit_gets_431_and_is_not_kept(proxy_factory: type[ProxyProcess]) -> None:
    proxy = proxy_factory({})  # the default limit, 64 KiB
    assert proxy.proc is not None
    before = rss_bytes(proxy.proc.pid)
    lines = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"a" * 1000) for i in range(64))
    with connect(proxy) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = 0
        with contextlib.suppress(OSError):  # the proxy stops reading and closes
            while sent < 50 * MiB:
                sock.sendall(lines)
                sent += len(lines)
        growth = rss_bytes(proxy.proc.pid) - before
        assert growth < 20 * MiB, (
            f"the proxy grew by {growth / MiB:.0f} MiB holding {sent / MiB:.0f} MiB of headers"
        )
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b'"header_too_large"' in answer and b"max_header_bytes" in answer
    with closing(HTTPConnection("127.0.0.1", proxy.port, timeout=5)) as conn:
        assert get(conn) == 200


def test_a_head_ending_within_the_limit_is_served_with_its_body(
    proxy_factory: type[ProxyProcess], upstream: Upstream
) -> None:
    proxy = proxy_factory(
        {"max_header_bytes": 4096, "servers": {"echo": {"url": upstream.base_url + "/_echo"}}}
    )
    with closing(HTTPConnection("127.0.0.1", proxy.port, timeout=10)) as conn:
        # Headers of 4,000 bytes pass; the 1 MiB body in the same write is not counted as head.
        headers = {f"X-Fill-{i}": "a" * 80 for i in range(42)}
        body = json.dumps({"pad": "b" * MiB}).encode()
        conn.request("POST", f"/{USER}/echo", body=body, headers=headers)
        answer = conn.getresponse()
        echoed = json.loads(answer.read())
        assert answer.status == 200, echoed
        assert len(echoed["body"]) == len(body)
        # One header more does not.
        headers["X-Fill-over"] = "a" * 200
        conn.request("POST", f"/{USER}/echo", body=body, headers=headers)
        answer = conn.getresponse()
        assert answer.status == 431
        assert json.loads(answer.read())["error"] == "header_too_large"
    # Pipelined heads each within the limit, together over it, in one write.
    head = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: %s\r\n" % (b"a" * 1400)
    with connect(proxy) as sock:
        sock.sendall(head + b"\r\n" + head + b"\r\n" + head + b"Connection: close\r\n\r\n")
        answers = read_until_closed(sock)
    assert answers.count(b"HTTP/1.1 200 ") == 3, answers[:300]


def test_trickled_heads_are_cut_off_at_header_timeout(proxy_factory: type[ProxyProcess]) -> None:
    proxy = proxy_factory({"header_timeout": 1})
    socks = [connect(proxy) for _ in range(20)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        selector.register(sock, selectors.EVENT_READ)
    started = time.monotonic()
    with contextlib.suppress(OSError):
        for i in range(20):  # a header line every 0.3 s on each, for 6 s at most
            for sock in socks:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            if len(selector.select(0.3)) == len(socks):
                break
    answers = [read_until_closed(sock) for sock in socks]
    elapsed = time.monotonic() - started
    for sock in socks:
        sock.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        assert b'"header_timeout"' in answer
    assert elapsed < 5, f"the trickles lasted {elapsed:.1f} s"
    [logged] = log_events(proxy, "request_head_too_slow")  # one line for the burst
    assert logged["count"] == 1 and logged["client"] == "127.0.0.1"


def test_a_connection_that_sends_nothing_is_closed(proxy_factory: type[ProxyProcess]) -> None:
    proxy = proxy_factory({"header_timeout": 1})
    with connect(proxy) as sock:
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]


def test_line_breaks_trickled_after_a_response_are_cut_off(proxy_factory: type[ProxyProcess]) -> None:
    # Any byte stops uvicorn's keep-alive timer, and empty lines between requests begin none.
    proxy = proxy_factory({"header_timeout": 1})
    with connect(proxy) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while not first.endswith(b"ok\n"):  # the head and the body may come in two reads
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        with contextlib.suppress(OSError):
            for _ in range(20):  # 6 s at most
                sock.sendall(b"\r\n")
                if select.select([sock], [], [], 0.3)[0]:
                    break
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]


def test_a_second_head_trickled_on_a_kept_alive_connection_is_cut_off(
    proxy_factory: type[ProxyProcess],
) -> None:
    # A head that arrives whole arms no clock; one still incomplete after its first read does,
    # from that read on (serving.py), as the connection's first head's clock runs from the start.
    proxy = proxy_factory({"header_timeout": 1})
    with connect(proxy) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while not first.endswith(b"ok\n"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        started = time.monotonic()
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /ping HTTP/1.1\r\n")
            for i in range(20):  # a header line every 0.3 s, 6 s at most
                if select.select([sock], [], [], 0.3)[0]:
                    break
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert time.monotonic() - started < 5


def test_connections_beyond_max_connections_are_closed_at_once(proxy_factory: type[ProxyProcess]) -> None:
    proxy = proxy_factory({"max_connections": 5})
    conns = [HTTPConnection("127.0.0.1", proxy.port, timeout=5) for _ in range(5)]
    for conn in conns:
        assert get(conn) == 200
    sockets = [conn.sock.getsockname() for conn in conns]  # type: ignore[attr-defined]
    for _ in range(10):
        with connect(proxy) as extra:
            extra.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_until_closed(extra) == b""
    for conn in conns:  # the five still work, on their own connections
        assert get(conn) == 200
    assert [conn.sock.getsockname() for conn in conns] == sockets  # type: ignore[attr-defined]
    for conn in conns:
        conn.close()
    deadline = time.monotonic() + 5
    while True:  # the proxy notices the closes as they arrive
        with (
            contextlib.suppress(OSError),
            closing(HTTPConnection("127.0.0.1", proxy.port, timeout=5)) as conn,
        ):
            assert get(conn) == 200
            break
        assert time.monotonic() < deadline, "no new connection accepted after the five closed"
        time.sleep(0.1)
    [logged] = log_events(proxy, "connections_refused")  # the first refusal; the rest fall in its interval
    assert logged["count"] == 1 and logged["max_connections"] == 5


def test_keep_alive_slow_bodies_and_event_streams_outlast_header_timeout(
    proxy_factory: type[ProxyProcess], upstream: Upstream
) -> None:
    # Each wait below is a multiple of header_timeout; half a second (the other tests' 1 s
    # made this one take 6 s) is still far more than a whole head takes to arrive.
    timeout = 0.5
    servers = {
        "echo": {"url": upstream.base_url + "/_echo"},
        "ticks": {"url": upstream.base_url + "/_sse_ticks?n=-1&interval=0.1"},
    }
    proxy = proxy_factory({"header_timeout": timeout, "servers": servers})
    with closing(HTTPConnection("127.0.0.1", proxy.port, timeout=5)) as conn:
        assert get(conn) == 200
        where = conn.sock.getsockname()  # type: ignore[attr-defined]
        # idle between requests: uvicorn's keep-alive timeout (5 s), not header_timeout
        time.sleep(1.5 * timeout)
        assert get(conn) == 200
        assert conn.sock.getsockname() == where  # type: ignore[attr-defined]

    with connect(proxy) as sock:  # a body that takes longer than header_timeout to arrive
        body = b'{"slow": "body"}'
        sock.sendall(
            b"POST /%s/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
            % (USER.encode(), len(body))
        )
        for piece in (body[:5], body[5:10], body[10:]):
            time.sleep(0.6 * timeout)
            sock.sendall(piece)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answers = read_until_closed(sock, timeout=10)
    assert answers.startswith(b"HTTP/1.1 200 "), answers[:300]
    assert b'\\"slow\\": \\"body\\"' in answers
    assert answers.count(b"HTTP/1.1 200 ") == 2

    ticks = 0
    with httpx.stream("GET", f"{proxy.url}/{USER}/ticks", timeout=5) as stream:
        started = time.monotonic()
        for line in stream.iter_lines():
            ticks += line == "event: tick"
            if time.monotonic() - started > 2.5 * timeout:
                break
    assert ticks >= 5


def test_the_limits_hold_in_every_worker(proxy_factory: type[ProxyProcess]) -> None:
    proxy = proxy_factory({"workers": 2, "max_header_bytes": 4096, "header_timeout": 1})
    head = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: %s\r\n\r\n" % (b"a" * 8192)
    for _ in range(6):  # new connections, accepted by either worker
        with connect(proxy) as sock:
            sock.sendall(head)
            assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
    with connect(proxy) as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    with closing(HTTPConnection("127.0.0.1", proxy.port, timeout=5)) as conn:
        assert get(conn) == 200


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("max_header_bytes", "512", "at least 1024"),
        ("max_connections", "0", "at least 1"),
        ("header_timeout", "0", "between 0 and 86400"),
        ("max_connections", "many", "whole number"),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_setting(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={f"KEYBEARER_{name.upper()}": value})
    assert info.value.key in (name, f"KEYBEARER_{name.upper()}") and says in info.value.message


def test_an_idle_connection_closes_after_the_keep_alive_timeout_a_busy_one_stays(
    proxy_factory: type[ProxyProcess], upstream: Upstream
) -> None:
    # serving.py keeps one keep-alive timer per connection, moved lazily: it must still
    # close an idle connection on time, and never a connection that answered lately.
    proxy = proxy_factory({"servers": {"echo": {"url": upstream.base_url + "/_echo", "auth": "none"}}})
    idle, busy = connect(proxy), connect(proxy)
    request = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with idle, busy:
        idle.sendall(request)
        assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        busy.settimeout(5)
        while time.monotonic() - started < 6.5:  # past the idle one's 5 s
            busy.sendall(request)
            assert busy.recv(65536).startswith(b"HTTP/1.1 200 "), "a busy connection was closed"
            if 4.0 < time.monotonic() - started < 4.5:
                assert not select.select([idle], [], [], 0)[0], "closed before the keep-alive timeout"
            time.sleep(0.4)
        assert read_until_closed(idle, timeout=0.1) == b""
        closed_after = time.monotonic() - started
        busy.sendall(request)
        assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert closed_after < 7.5
