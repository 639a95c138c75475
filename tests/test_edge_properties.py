"""Properties of every parser at the proxy's edge, checked on generated input.

Each parser reads something a stranger controls (a path, a link, a stream, a
header, a token response, a JSON body). The properties: it never fails with
anything but its own error, and what it accepts is what the documentation
promises. Example counts are modest so that the file runs in seconds.
"""

from __future__ import annotations

import itertools
import json
import secrets
import string
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import links, routing, upstream
from proxy.crypto import Keyring
from proxy.jsonbody import MAX_DEPTH, JSONBodyError, parse_json
from proxy.legacy_sse import MAX_FIRST_EVENT, EndpointRewriter, ForeignEndpoint
from proxy.oauth.client import OAuthError, TokenResponse, parse_token_response
from proxy.oauth.discovery import parse_www_authenticate
from proxy.settings import ID_PATTERN, SERVER_ID_PATTERN, UPSTREAM_PATH_PATTERN, ServerConfig, parse_server

few = settings(max_examples=150, deadline=None, database=None)
some = settings(max_examples=400, deadline=None, database=None)

# -- routing ------------------------------------------------------------------

users = st.from_regex(ID_PATTERN, fullmatch=True)
server_ids = st.from_regex(SERVER_ID_PATTERN, fullmatch=True)
# Segments an attacker would try, beside arbitrary text.
tricky_segments = st.sampled_from(
    ["", ".", "..", "%2F", "%2f", "%2e%2e", "%2E", "%", "\\", "a\\b", "..\\x", "é", " ", "~", "mcp",
     "admin", "ADMIN", "Metrics", "well-known", ".well-known", "ping", "connect", "alice", "srv", "a@b.c"]
)  # fmt: skip
segments = st.one_of(tricky_segments, users, server_ids, st.text(max_size=20))
raw_paths = st.one_of(
    st.binary(max_size=200),
    st.lists(segments, max_size=6).map(lambda parts: ("/" + "/".join(parts)).encode()),
    st.tuples(users, server_ids, st.lists(segments, max_size=4)).map(
        lambda t: "/".join(("", t[0], t[1], *t[2])).encode()
    ),
)


@some
@given(raw_paths)
@example(b"/alice/srv/a/%2e%2e/b")
@example(b"/alice/srv/..")
@example(b"/alice/srv/mcp")
@example(b"/alice/srv/a\\..\\b")
def test_a_raw_path_is_a_valid_route_or_a_route_error(raw: bytes) -> None:
    try:
        route = routing.parse(raw)
    except routing.RouteError as exc:
        assert exc.status in (400, 404)
        return
    assert ID_PATTERN.fullmatch(route.user) and route.user.lower() not in routing.RESERVED
    assert SERVER_ID_PATTERN.fullmatch(route.server_id)
    for name in (route.user, route.server_id):
        assert not set(name) & set("%/\\") and name not in (".", "..")
    if route.subpath:
        assert route.subpath.startswith("/") and not set(route.subpath) & set("%\\")
        assert not set(route.subpath.split("/")) & {".", ".."}
    # Nothing was dropped or decoded on the way.
    rebuilt = f"/{route.user}/{route.server_id}{route.subpath}"
    assert raw.decode() in (rebuilt, rebuilt + "/") or (
        not route.subpath and raw.decode() == rebuilt + "/mcp"
    )


def _route_or_code(parse: Any, path: Any) -> object:
    try:
        return parse(path)
    except routing.RouteError as exc:
        return exc.code


@some
@given(raw_paths)
@example(b"/alice/srv/")
@example(b"/Admin/srv/mcp")
@example(b"/alice/srv/mcp/")
@example(b"/alice/srv/mcp\n")
def test_the_usual_paths_one_match_agrees_with_the_checks_one_by_one(raw: bytes) -> None:
    try:
        path = raw.decode("ascii")
    except UnicodeDecodeError:
        return
    assert _route_or_code(routing.parse, raw) == _route_or_code(routing._parse, path)


upstream_paths = st.from_regex(UPSTREAM_PATH_PATTERN, fullmatch=True).filter(
    lambda p: not set(p.split("/")) & {".", ".."}
)


@st.composite
def servers(draw: st.DrawFn) -> ServerConfig:
    origin = draw(st.sampled_from(["http://127.0.0.1:9000", "https://mcp.example.com", "http://[::1]:8080"]))
    path = draw(st.one_of(st.just(""), upstream_paths))
    query = draw(st.sampled_from(["", "?n=1", "?a=b&c=d"]))
    paths = draw(st.lists(upstream_paths.filter(lambda p: p != "/mcp"), max_size=3))
    return parse_server("srv", {"url": origin + path + query, "auth": "none", "paths": paths}, key="t")


@some
@given(
    servers(),
    st.one_of(st.just(""), upstream_paths, st.text(max_size=30)),
    st.binary(max_size=60),
    st.frozensets(upstream_paths, max_size=3),
)
def test_upstream_url_stays_on_the_origin_and_the_allowed_paths(
    server: ServerConfig, subpath: str, query: bytes, announced: frozenset[str]
) -> None:
    try:
        url = routing.upstream_url(server, subpath, query, announced)
    except routing.RouteError as exc:
        assert exc.status == 404 and subpath
        return
    # As the forwarder's own client reads it: same host and port, allowed path.
    origin, target = upstream.split_url(url)
    assert origin == upstream.split_url(server.url)[0]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == server.origin
    if subpath:
        assert subpath in announced or subpath in server.paths
        assert parts.path == subpath
    else:
        assert parts.path == urlsplit(server.url).path
    assert target.startswith((parts.path or "/").encode())


def test_announced_and_configured_paths_are_reachable() -> None:
    server = parse_server("srv", {"url": "http://h:1/sse", "auth": "none", "paths": ["/extra"]}, key="t")
    assert routing.upstream_url(server, "/extra", b"", frozenset()) == "http://h:1/extra"
    assert routing.upstream_url(server, "/m", b"s=1", frozenset({"/m"})) == "http://h:1/m?s=1"


# -- signed links -------------------------------------------------------------

KEYRING = Keyring(secrets.token_urlsafe(48))
scope_tokens = st.text(alphabet=string.ascii_letters + string.digits + ":._-/", min_size=1, max_size=12)
scopes = st.lists(scope_tokens, max_size=4).map(tuple)


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


@few
@given(users, server_ids, scopes, st.integers(min_value=60, max_value=10**7))
def test_a_connect_link_verifies_as_made(user: str, server: str, wanted: tuple[str, ...], ttl: int) -> None:
    url = links.connect_url("http://p", KEYRING, user, server, ttl, wanted)
    assert urlsplit(url).path == links.connect_path(user, server)
    assert links.verify(KEYRING, "connect", user, server, query_of(url)) == wanted
    people = links.connections_url("http://p", KEYRING, user, ttl)
    assert links.verify(KEYRING, "connections", user, "", query_of(people)) == ()


@few
@given(
    users,
    server_ids,
    scopes,
    st.sampled_from(["user", "server", "scope", "expires", "sig", "kind"]),
    st.data(),
)
def test_any_change_to_a_link_is_refused(
    user: str, server: str, wanted: tuple[str, ...], part: str, data: st.DataObject
) -> None:
    params = query_of(links.connect_url("http://p", KEYRING, user, server, 600, wanted))
    kind = "connect"
    if part == "user":
        user = data.draw(users.filter(lambda u: u != user))
    elif part == "server":
        server = data.draw(server_ids.filter(lambda s: s != server))
    elif part == "scope":
        params["scope"] = data.draw(st.text(max_size=30).filter(lambda s: s != params.get("scope", "")))
    elif part == "expires":
        params["expires"] = str(int(params["expires"]) + data.draw(st.integers(1, 10**6)))
    elif part == "sig":
        params["sig"] = data.draw(st.text(min_size=1, max_size=60).filter(lambda s: s != params["sig"]))
    else:
        kind = "connections"
    with pytest.raises(links.LinkError):
        links.verify(KEYRING, kind, user, server, params)


query_values = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "é", "\x00", "²", "\uff11\uff12\uff13", "9" * 5000, "-1", " 1", "1e9", "ﬁ" * 2000]),
    st.integers(min_value=0).map(str),
)


@some
@given(users, server_ids, st.dictionaries(st.sampled_from(["expires", "sig", "scope", "x"]), query_values))
@example("alice", "srv", {"expires": "4102444800", "sig": "é"})
@example("alice", "srv", {"expires": "²", "sig": "abc"})
@example("alice", "srv", {"expires": "9" * 5000, "sig": "abc"})
def test_any_query_is_a_link_or_a_link_error(user: str, server: str, params: dict[str, str]) -> None:
    try:
        links.verify(KEYRING, "connect", user, server, params)
    except links.LinkError:
        return
    raise AssertionError("an unsigned query was taken for a link")


@some
@given(st.binary(max_size=40), st.text(max_size=100))
@example(b"csrf", "é")
def test_verify_answers_false_for_any_wrong_signature(message: bytes, signature: str) -> None:
    assert KEYRING.verify("link", message, signature) is False
    assert KEYRING.verify("link", message, KEYRING.sign("link", message)) is True


# -- the legacy SSE endpoint event ---------------------------------------------

LEGACY = parse_server("legacy", {"url": "http://127.0.0.1:9000/sse", "auth": "none"}, key="t")
PREFIX, PROXY_ORIGIN = "/alice/legacy", "http://proxy:8080"

line_ends = st.sampled_from(["\n", "\r\n", "\r"])
announced_urls = st.one_of(
    upstream_paths.map(lambda p: p + "?session_id=1"),
    st.sampled_from(
        ["/messages/", "messages/?s=1", "/sse", "http://127.0.0.1:9000/m?x=1", "http://127.0.0.1:9001/m",
         "//evil.example/m", "https://127.0.0.1:9000/m", "http://evil.example/m", "/a/../b", "/%2e%2e/x",
         "http://[", "http://127.0.0.1:99999/m", "javascript:alert(1)", "", " /m ", "?only=query"]
    ),
    st.text(max_size=40),
)  # fmt: skip


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    end = draw(line_ends)
    parts = [f": keep-alive{end}{end}" for _ in range(draw(st.integers(0, 2)))]
    kind = draw(st.sampled_from(["endpoint", "message", None]))
    fields = [f"event: {kind}"] if kind else []
    fields += [f"data: {draw(announced_urls)}"]
    if draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), ": a comment")
    parts.append(end.join(fields) + end + end)
    parts.append(f"event: message{end}data: {{}}{end}{end}")
    stream = "".join(parts).encode()
    return stream if draw(st.booleans()) else stream + draw(st.binary(max_size=40))


def run(stream: bytes, cuts: list[int]) -> tuple[bytes, list[str], str | None]:
    """What the rewriter relays for the stream cut at `cuts`, the paths it
    noted, and the ForeignEndpoint that ended it, if one did."""
    announced: list[str] = []
    rewriter = EndpointRewriter(LEGACY, LEGACY.url, PREFIX, PROXY_ORIGIN, announced.append)
    out = b""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    try:
        for start, stop in itertools.pairwise(bounds):
            out += rewriter.feed(stream[start:stop])
    except ForeignEndpoint as exc:
        return out, announced, str(exc)
    return out, announced, None


def first_event_data(out: bytes) -> str | None:
    """The endpoint URL of the first event relayed, if it is an endpoint event."""
    text = out.decode("utf-8", "replace")
    for block in text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            if "event: endpoint" not in lines:
                return None
            return "".join(line[6:] for line in lines if line.startswith("data: "))
    return None


def cut_points(stream_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, stream_size), max_size=8)


@some
@given(event_streams(), st.data())
def test_endpoint_rewrite_does_not_depend_on_chunking(stream: bytes, data: st.DataObject) -> None:
    whole = run(stream, [])
    for cuts in (data.draw(cut_points(len(stream))), list(range(len(stream)))):
        out, announced, refused = run(stream, cuts)
        assert (announced, refused) == whole[1:]
        if refused is None:
            assert out == whole[0]
        else:
            # Keep-alive comments that came in earlier chunks were relayed; nothing of the event.
            assert stream.startswith(out) and b"data" not in out


@some
@given(event_streams())
@example(b"event: endpoint\ndata: http://[\n\n")
@example(b"event: endpoint\r\ndata: //[::1\r\n\r\n")
def test_a_relayed_endpoint_points_back_at_the_proxy(stream: bytes) -> None:
    out, announced, refused = run(stream, [])
    endpoint = first_event_data(out)
    if endpoint is None:
        return
    parts = urlsplit(endpoint)
    assert parts.scheme in ("", "http") and f"{parts.scheme}://{parts.netloc}" in ("://", PROXY_ORIGIN)
    assert parts.path == PREFIX or parts.path.startswith(PREFIX + "/")
    assert not set(parts.path.split("/")) & {".", ".."} and "\\" not in parts.path
    assert announced == ([parts.path.removeprefix(PREFIX)] if parts.path != PREFIX else [])
    assert refused is None


FOREIGN = b"event: endpoint\ndata: http://evil.example/m\n\n"


@pytest.mark.parametrize("pad", ["data", "comment"])
@pytest.mark.parametrize("where", [MAX_FIRST_EVENT - 100, MAX_FIRST_EVENT + 1, MAX_FIRST_EVENT + 100])
def test_a_long_first_event_is_judged_the_same_however_it_arrives(pad: str, where: int) -> None:
    """A long endpoint event (padded with data lines or comments) is refused,
    or passed, alike whether it comes in one chunk or cut at any point."""
    filler = b"data: " if pad == "data" else b": "
    head = b"event: endpoint\n" + filler + b"x" * 70_000 + b"\n"
    stream = head + b"data: http://evil.example/m\n\n" + FOREIGN
    whole = run(stream, [])
    assert whole[2] is not None  # an endpoint event, however long, is never relayed unrewritten
    assert run(stream, [where]) == whole
    assert run(stream, [where, where + 1, where + 3]) == whole


@few
@given(st.binary(min_size=1, max_size=300), st.data())
def test_bytes_held_back_are_bounded(noise: bytes, data: st.DataObject) -> None:
    """A first event that never ends is relayed as it is once MAX_FIRST_EVENT
    bytes have come, so at most that much (plus a chunk) is ever held back."""
    line = noise.replace(b"\n", b"").replace(b"\r", b"") or b"x"
    stream = b"data: " + line * (MAX_FIRST_EVENT // len(line) + 2)
    out, _, refused = run(stream, data.draw(cut_points(len(stream))))
    assert refused is None and out == stream


# -- WWW-Authenticate -----------------------------------------------------------


@some
@given(st.one_of(st.text(max_size=200), st.lists(st.text(max_size=60), max_size=4), st.none()))
@example('Bearer resource_metadata="')
@example('Bearer error="a\\')
@example("Bearer ,,,, =")
def test_any_header_parses_or_gives_none(header: str | list[str] | None) -> None:
    challenge = parse_www_authenticate(header)
    assert challenge is None or all(isinstance(v, str) for v in challenge.params.values())


def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=60)
error_codes = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=20)
scope_values = st.lists(st.text(alphabet=string.ascii_letters + ":._-", min_size=1, max_size=10), max_size=4)


@some
@given(
    printable,
    scope_values,
    error_codes,
    st.sampled_from(["", 'Basic realm="x", ', "Negotiate abc==, ", 'DPoP algs="ES256", ']),
    st.permutations(["resource_metadata", "scope", "error"]),
)
def test_a_bearer_challenge_round_trips(
    metadata: str, scope: list[str], error: str, before: str, order: list[str]
) -> None:
    values = {"resource_metadata": metadata, "scope": " ".join(scope), "error": error}
    params = ", ".join(f"{name}={quoted(values[name])}" for name in order)
    challenge = parse_www_authenticate(f"{before}Bearer {params}")
    assert challenge is not None
    assert challenge.resource_metadata == metadata
    assert challenge.scope == tuple(scope)
    assert challenge.error == error


# -- the token response ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
token_like = st.one_of(
    st.text(max_size=40), st.sampled_from(["tok\r\nX-Evil: 1", "tok\x00", "tok\n", "tök", "a b", "x" * 3000])
)
token_answers = st.fixed_dictionaries(
    {},
    optional={
        "access_token": st.one_of(token_like, json_values),
        "token_type": st.one_of(st.sampled_from(["Bearer", "bearer", "BEARER", "mac", ""]), json_values),
        "expires_in": st.one_of(
            st.integers(),
            st.floats(),
            st.sampled_from(["3600", " 60 ", "²", "9" * 5000, "-1", "1e3"]),
            json_values,
        ),
        "refresh_token": st.one_of(token_like, json_values),
        "scope": st.one_of(st.text(max_size=30), json_values),
        "extra": json_values,
    },
)


@some
@given(token_answers)
@example({"access_token": "a", "token_type": "Bearer", "expires_in": "²"})
@example({"access_token": "a", "token_type": "Bearer", "expires_in": 10**400})
def test_any_token_answer_is_a_token_response_or_an_oauth_error(answer: dict[str, Any]) -> None:
    try:
        tokens = parse_token_response(answer)
    except OAuthError as exc:
        assert exc.error == "invalid_response"
        return
    assert isinstance(tokens, TokenResponse) and tokens.token_type == "Bearer"
    for token in (tokens.access_token, tokens.refresh_token):
        assert token is None or (token.isascii() and token.isprintable())
    assert tokens.expires_in is None or 0 <= tokens.expires_in < 10**12
    assert tokens.scope is None or all(isinstance(s, str) for s in tokens.scope)


@pytest.mark.parametrize("name", ["access_token", "refresh_token"])
@pytest.mark.parametrize("bad", ["\r\nX-Injected: 1", "\n", "\x00", "\x7f", "\u2028", "é"])
def test_a_token_with_control_characters_is_refused(name: str, bad: str) -> None:
    """Such a token could not go into an Authorization header; taken, it was
    stored and every request then failed blaming "the server's API key"."""
    secret = "secret-token-" + secrets.token_hex(8)
    answer = {"access_token": "fine-access-token", "token_type": "Bearer", name: secret + bad + "tail"}
    with pytest.raises(OAuthError) as info:
        parse_token_response(answer)
    assert info.value.error == "invalid_response"
    assert "token response" in str(info.value) and name in str(info.value)
    assert secret not in str(info.value) and "API key" not in str(info.value)


# -- JSON bodies ------------------------------------------------------------------

json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
# Strings that look like structure: brackets, quotes and backslashes inside.
sneaky_strings = st.text(alphabet='[]{}"\\ab,:', max_size=30)


def nested(depth: int, core: Any) -> Any:
    for level in range(depth):
        core = [core] if level % 2 else {"k": core}
    return core


@some
@given(st.one_of(json_documents, sneaky_strings, st.lists(sneaky_strings)), st.integers(0, 2 * MAX_DEPTH))
@example(["[[[[", '"]]"', "\\"], MAX_DEPTH - 1)
def test_json_up_to_the_cap_parses_as_json_loads_would_and_deeper_is_refused(
    document: Any, depth: int
) -> None:
    value = nested(depth, document)
    raw = json.dumps(value).encode()
    if _depth(value) <= MAX_DEPTH:
        assert parse_json(raw) == json.loads(raw)
    else:
        with pytest.raises(JSONBodyError):
            parse_json(raw)


@some
@given(st.one_of(st.binary(max_size=300), st.text(alphabet='[]{}"\\ 1,:', max_size=300).map(str.encode)))
@example(b"[" * 100_000)
@example(b'"\\"' + b"[" * 1000)
@example(b"\xef\xbb\xbf{}")
def test_any_bytes_parse_or_give_a_json_body_error(raw: bytes) -> None:
    try:
        parse_json(raw)
    except JSONBodyError:
        pass


@some
@given(
    st.sampled_from([b"", b"\xef\xbb\xbf"]),
    st.text(alphabet=" \t\r\n\x0c\ufeff", max_size=3),
    json_documents,
    st.text(alphabet=" \t\r\n\x0cx", max_size=3),
)
@example(b"", "", {"a": 1}, " x")
@example(b"\xef\xbb\xbf", "\ufeff", [], "")
def test_json_parses_exactly_as_json_loads_of_the_utf8_sig_text(
    bom: bytes, before: str, document: Any, after: str
) -> None:
    # parse_json calls the C scanner itself and decodes without the utf-8-sig codec (for speed):
    # byte order marks and whitespace around the value must be taken or refused as json.loads does.
    raw = bom + (before + json.dumps(document) + after).encode()
    try:
        expected = json.loads(raw.decode("utf-8-sig"))
    except ValueError:
        with pytest.raises(JSONBodyError):
            parse_json(raw)
    else:
        assert parse_json(raw) == expected


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


# -- the JSON-RPC method a request names (the request log's mcp_method) ---------

method_names = st.one_of(
    st.sampled_from(["tools/call", "tools/list", "initialize", "method", "", "a" * 64, "a" * 65]),
    st.text(max_size=70),
)
members = st.sampled_from(["jsonrpc", "id", "method", "params", "method", "\\u006dethod", "x"])


@some
@given(
    st.lists(
        st.tuples(members, st.one_of(method_names, json_documents, st.integers(), st.none())), max_size=6
    ),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
    st.booleans(),
)
@example([("jsonrpc", "2.0"), ("id", 1), ("method", "tools/list")], (",", ":"), True)
@example([("method", "a"), ("params", {"method": "b"})], (",", ":"), True)
@example([("method", "a"), ("method", "b")], (",", ":"), True)
@example([("method", "a"), ("\\u006dethod", "b")], (",", ":"), True)
def test_the_method_found_near_the_front_is_the_one_the_parse_finds(
    pairs: list[tuple[str, Any]], separators: tuple[str, str], ascii_only: bool
) -> None:
    from proxy.forwarding import _mcp_method

    # Written out by hand: duplicate members, and a member name spelt with an escape.
    item, key = separators
    text = (
        "{"
        + item.join(
            (f'"{name}"' if name.startswith("\\") else json.dumps(name))
            + key
            + json.dumps(value, ensure_ascii=ascii_only)
            for name, value in pairs
        )
        + "}"
    )
    body = text.encode()
    message = json.loads(body)
    method = message.get("method")
    assert _mcp_method({"headers": []}, body) == (method[:64] if isinstance(method, str) else None)
