"""Path rules for /<user>/<server>[/<path>] and the legacy endpoint rewrite."""

from __future__ import annotations

import pytest

from proxy import routing
from proxy.legacy_sse import EndpointRewriter, ForeignEndpoint
from proxy.settings import parse_server

SERVER = parse_server("legacy", {"url": "http://127.0.0.1:9000/sse", "auth": "none"}, key="t")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (b"/alice", "not_found"),
        (b"/al%2Fice/srv", "invalid_path"),
        (b"/alice/s%2e%2e", "invalid_path"),
        (b"/../srv", "invalid_user"),
        (b"/alice/../admin", "invalid_server"),
        (b"/alice/srv/messages/%2e%2e/admin", "invalid_path"),
        (b"/alice/srv/a/../b", "invalid_path"),
        (b"/admin/srv", "reserved_user"),
        (b"/Metrics/srv", "reserved_user"),
        (b"/" + b"u" * 129 + b"/srv", "invalid_user"),
        (b"/alice/Srv", "invalid_server"),
        (b"/al ice/srv", "invalid_user"),
        ("/alicé/srv".encode(), "invalid_path"),
    ],
)
def test_refused_paths(path: bytes, code: str) -> None:
    with pytest.raises(routing.RouteError) as info:
        routing.parse(path)
    assert info.value.code == code


def test_accepted_paths() -> None:
    assert routing.parse(b"/alice@example.com/srv") == routing.Route("alice@example.com", "srv", "")
    assert routing.parse(b"/u-1/srv/") == routing.Route("u-1", "srv", "")
    assert routing.parse(b"/u/srv/messages/") == routing.Route("u", "srv", "/messages/")


def test_only_endpoint_and_announced_paths_reachable() -> None:
    assert routing.upstream_url(SERVER, "", b"", frozenset()) == "http://127.0.0.1:9000/sse"
    assert routing.upstream_url(SERVER, "", b"a=1", frozenset()) == "http://127.0.0.1:9000/sse?a=1"
    with pytest.raises(routing.RouteError) as info:
        routing.upstream_url(SERVER, "/messages/", b"", frozenset())
    assert info.value.status == 404
    url = routing.upstream_url(SERVER, "/messages/", b"session_id=ab", frozenset({"/messages/"}))
    assert url == "http://127.0.0.1:9000/messages/?session_id=ab"


def rewriter(announced: list[str]) -> EndpointRewriter:
    return EndpointRewriter(SERVER, SERVER.url, "/alice/legacy", "http://proxy:8080", announced.append)


def test_endpoint_event_relative_and_absolute() -> None:
    seen: list[str] = []
    r = rewriter(seen)
    # split across chunks, preceded by a keep-alive comment
    assert r.feed(b": ping\n\nevent: endpoint\r\ndata: /messages/?sess") == b": ping\n\n"
    out = r.feed(b"ion_id=42\r\n\r\nevent: message\ndata: {}\n\n")
    assert (
        out == b"event: endpoint\ndata: /alice/legacy/messages/?session_id=42\n\nevent: message\ndata: {}\n\n"
    )
    assert seen == ["/messages/"]
    assert r.feed(b"event: endpoint\ndata: /x\n\n") == b"event: endpoint\ndata: /x\n\n"  # only the first
    absolute = rewriter([]).feed(b"event: endpoint\ndata: http://127.0.0.1:9000/messages/?s=1\n\n")
    assert absolute == b"event: endpoint\ndata: http://proxy:8080/alice/legacy/messages/?s=1\n\n"


def test_endpoint_on_another_origin_refused() -> None:
    with pytest.raises(ForeignEndpoint):
        rewriter([]).feed(b"event: endpoint\ndata: http://evil.example/messages/\n\n")
    with pytest.raises(ForeignEndpoint):
        rewriter([]).feed(b"event: endpoint\ndata: //127.0.0.1:9001/messages/\n\n")
