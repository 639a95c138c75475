"""Path rules for /<user>/<server>[/<path>] and the legacy endpoint rewrite."""

from __future__ import annotations

import pytest

from proxy import routing
from proxy.legacy_sse import EndpointRewriter, ForeignEndpoint
from proxy.settings import ConfigError, parse_server

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


def test_mcp_below_the_server_is_its_endpoint() -> None:
    # For clients that replace any path not ending in /mcp with /mcp (the MCP Inspector's CLI).
    assert routing.parse(b"/alice/srv/mcp") == routing.parse(b"/alice/srv")
    route = routing.parse(b"/alice/legacy/mcp")
    assert routing.upstream_url(SERVER, route.subpath, b"a=1", frozenset()) == "http://127.0.0.1:9000/sse?a=1"
    # Only exactly /mcp: anything longer or spelled otherwise is an upstream path as before.
    assert routing.parse(b"/alice/srv/mcp/").subpath == "/mcp/"
    assert routing.parse(b"/alice/srv/mcp/x").subpath == "/mcp/x"
    assert routing.parse(b"/alice/srv/MCP").subpath == "/MCP"
    with pytest.raises(routing.RouteError) as info:
        routing.parse(b"/alice/srv/mc%70")
    assert info.value.code == "invalid_path"


def test_a_server_cannot_open_an_upstream_mcp_path() -> None:
    # /<user>/<server>/mcp is the endpoint: an upstream /mcp listed in paths could never be reached.
    with pytest.raises(ConfigError) as info:
        parse_server("s", {"url": "http://h:1/sse", "paths": ["/messages/", "/mcp"]}, key="servers.s")
    assert info.value.key == "servers.s.paths[1]" and "server of its own" in str(info.value)
    assert parse_server("s", {"url": "http://h:1/sse", "paths": ["/mcp/x"]}, key="t").paths == ("/mcp/x",)


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


def test_endpoint_rewrite_points_at_the_canonical_form() -> None:
    # Whether the agent opened the stream at /alice/legacy or /alice/legacy/mcp, the
    # announced endpoint is rewritten under /alice/legacy, where routing finds it.
    seen: list[str] = []
    out = rewriter(seen).feed(b"event: endpoint\ndata: /sse?session_id=1\n\n")
    assert out == b"event: endpoint\ndata: /alice/legacy?session_id=1\n\n" and seen == []


def test_an_announced_mcp_message_path_is_refused() -> None:
    # /alice/legacy/mcp is the endpoint: messages posted there would not reach upstream /mcp.
    seen: list[str] = []
    with pytest.raises(ForeignEndpoint, match="/mcp"):
        rewriter(seen).feed(b"event: endpoint\ndata: /mcp?session_id=1\n\n")
    assert seen == []
    mcp_server = parse_server("m", {"url": "http://127.0.0.1:9000/mcp"}, key="t")
    same = EndpointRewriter(mcp_server, mcp_server.url, "/alice/m", "http://proxy:8080", seen.append)
    assert same.feed(b"event: endpoint\ndata: /mcp?s=1\n\n") == b"event: endpoint\ndata: /alice/m?s=1\n\n"


def test_endpoint_on_another_origin_refused() -> None:
    with pytest.raises(ForeignEndpoint):
        rewriter([]).feed(b"event: endpoint\ndata: http://evil.example/messages/\n\n")
    with pytest.raises(ForeignEndpoint):
        rewriter([]).feed(b"event: endpoint\ndata: //127.0.0.1:9001/messages/\n\n")
