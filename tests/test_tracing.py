"""OpenTelemetry traces (proxy/tracing.py) exported by a real proxy process to a real
OTLP/HTTP receiver on loopback: the span tree of one OAuth request whose token is
refreshed on the way, the agent's traceparent continued, the upstream given the
proxy's span as parent, and with tracing off nothing sent and nothing added."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from support import ProxyProcess

from proxy.connect.lifecycle import TokenSet, seal
from proxy.crypto import Keyring
from proxy.stores import Connection
from proxy.stores.sqlite import SQLiteStore

USER = "alice-tracer"
OLD_ACCESS = "at-old-" + secrets.token_urlsafe(12)
OLD_REFRESH = "rt-old-" + secrets.token_urlsafe(12)
AGENT_TRACE = secrets.token_hex(16)
AGENT_SPAN = secrets.token_hex(8)
CODE = "code-" + secrets.token_urlsafe(12)
TOOLS_LIST = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'


@dataclass
class Peers:
    """An OAuth-protected MCP server with its authorization server, and an OTLP receiver."""

    origin: str = ""
    otlp: str = ""
    issued: list[str] = field(default_factory=list)  # every token handed out
    valid: set[str] = field(default_factory=set)  # access tokens the MCP server takes
    upstream_headers: list[dict[str, str]] = field(default_factory=list)
    exports: list[bytes] = field(default_factory=list)

    def spans(self) -> list[Span]:
        out = []
        for body in self.exports:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    out.extend(scope_spans.spans)
        return out


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


# Tests name `peers` before `proxy_factory`, so that the proxies stop before the peers do:
# a proxy stopping exports its last spans, and waits for a collector that is gone.
@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    found = Peers()

    async def mcp(request: web.Request) -> web.Response:
        await request.read()
        found.upstream_headers.append(dict(request.headers))
        if request.headers.get("Authorization", "").removeprefix("Bearer ") in found.valid:
            return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}})
        challenge = f'Bearer resource_metadata="{found.origin}/.well-known/oauth-protected-resource/mcp"'
        return web.json_response(
            {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": challenge}
        )

    async def protected_resource(_: web.Request) -> web.Response:
        return web.json_response({"resource": f"{found.origin}/mcp", "authorization_servers": [found.origin]})

    async def as_metadata(_: web.Request) -> web.Response:
        return web.json_response({
            "issuer": found.origin, "authorization_endpoint": f"{found.origin}/authorize",
            "token_endpoint": f"{found.origin}/token", "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"], "token_endpoint_auth_methods_supported": ["none"],
        })  # fmt: skip

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        refreshes = form.get("grant_type") == "refresh_token" and form.get("refresh_token") == OLD_REFRESH
        exchanges = form.get("grant_type") == "authorization_code" and form.get("code") == CODE
        if not (refreshes or exchanges):
            return web.json_response({"error": "invalid_grant"}, status=400)
        access, refresh = "at-new-" + secrets.token_urlsafe(12), "rt-new-" + secrets.token_urlsafe(12)
        found.issued += [access, refresh]
        found.valid.add(access)
        return web.json_response(
            {"access_token": access, "token_type": "Bearer", "expires_in": 3600, "refresh_token": refresh}
        )

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        found.exports.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    upstream = web.Application()
    upstream.router.add_post("/mcp", mcp)
    upstream.router.add_get("/.well-known/oauth-protected-resource/mcp", protected_resource)
    upstream.router.add_get("/.well-known/oauth-protected-resource", protected_resource)
    upstream.router.add_get("/.well-known/oauth-authorization-server", as_metadata)
    upstream.router.add_post("/token", token)
    receiver = web.Application()
    receiver.router.add_post("/v1/traces", traces)
    runners = []
    for app, attr in ((upstream, "origin"), (receiver, "otlp")):
        runner, origin = await _serve(app)
        runners.append(runner)
        setattr(found, attr, origin)
    yield found
    for runner in runners:
        await runner.cleanup()


async def _seed_expired(database: Path, salt: str, issuer: str) -> None:
    """An expired connection for USER, as the connect flow would have stored it."""
    store = SQLiteStore(str(database))
    await store.open()
    try:
        await store.migrate()
        await _store(store, salt, issuer, OLD_ACCESS, time.time() - 60, version=1)
    finally:
        await store.close()


async def _store(
    store: SQLiteStore, salt: str, issuer: str, access: str, expires_at: float, version: int
) -> None:
    sealed = seal(Keyring(salt), USER, "guarded", TokenSet(access, OLD_REFRESH))
    await store.put_connection(Connection(
        user=USER, server="guarded", sealed=sealed, issuer=issuer, client_id="tracer", scopes=(),
        expires_at=expires_at, obtained_at=time.time() - 3660, version=version,
    ))  # fmt: skip


async def _proxy(
    proxy_factory: type[ProxyProcess],
    tmp_path: Path,
    salt: str,
    peers: Peers,
    env: dict[str, str],
    **config: Any,
) -> ProxyProcess:
    await _seed_expired(tmp_path / "keybearer.db", salt, peers.origin)
    servers = {"guarded": {"url": f"{peers.origin}/mcp", "auth": "oauth", "client_id": "tracer"}}
    proxy = proxy_factory({"oauth_allow_http_loopback": True, "servers": servers, **config}, env, start=False)
    await asyncio.to_thread(proxy.start)  # the peers answer on this loop meanwhile
    return proxy


async def _call(proxy: ProxyProcess, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{proxy.url}/{USER}/guarded/mcp",
            content=TOOLS_LIST,
            headers={"Content-Type": "application/json", "Accept": "application/json", **headers},
        )


def _attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


async def test_an_oauth_request_that_refreshes_exports_its_span_tree(
    peers: Peers, proxy_factory: type[ProxyProcess], tmp_path: Path, salt: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": peers.otlp, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    proxy = await _proxy(proxy_factory, tmp_path, salt, peers, env)
    answer = await _call(proxy, {"traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"})
    assert answer.status_code == 200, answer.text
    assert peers.issued, "the seeded token was not refreshed"

    names = {"forward", "credential", "refresh", "upstream", "oauth fetch"}
    deadline = time.monotonic() + 15
    while not names <= {span.name for span in peers.spans()}:
        assert time.monotonic() < deadline, f"spans never arrived: {[s.name for s in peers.spans()]}"
        await asyncio.sleep(0.05)
    spans = peers.spans()
    by_name: dict[str, list[Span]] = {}
    for span in spans:
        assert span.trace_id.hex() == AGENT_TRACE, span.name
        by_name.setdefault(span.name, []).append(span)
    (forward,) = by_name["forward"]
    (credential,) = by_name["credential"]
    (refresh,) = by_name["refresh"]
    (upstream,) = by_name["upstream"]
    # The tree: the agent's span > forward > credential > refresh > the token call, and
    # forward > upstream.
    assert forward.parent_span_id.hex() == AGENT_SPAN
    assert forward.kind == Span.SPAN_KIND_SERVER
    assert credential.parent_span_id == forward.span_id
    assert refresh.parent_span_id == credential.span_id
    assert upstream.parent_span_id == forward.span_id
    assert upstream.kind == Span.SPAN_KIND_CLIENT
    fetches = {_attributes(s)["url.full"]: s for s in by_name["oauth fetch"]}
    token_call = fetches[f"{peers.origin}/token"]
    assert token_call.parent_span_id == refresh.span_id
    assert _attributes(token_call)["http.response.status_code"] == 200
    assert all(s.parent_span_id == refresh.span_id for s in fetches.values())

    assert _attributes(forward) == {
        "http.request.method": "POST",
        "keybearer.server": "guarded",
        "mcp.method.name": "tools/list",
        "http.response.status_code": 200,
        "keybearer.outcome": "ok",
    }
    assert _attributes(credential) == {"keybearer.server": "guarded", "keybearer.auth": "oauth"}
    assert _attributes(upstream) == {"keybearer.server": "guarded", "http.response.status_code": 200}

    # The upstream's parent is the proxy's upstream span, not the agent's.
    assert peers.upstream_headers[-1]["traceparent"] == f"00-{AGENT_TRACE}-{upstream.span_id.hex()}-01"

    # Neither a token nor (by default) the user anywhere in what was exported.
    exported = b"".join(peers.exports)
    for secret in (OLD_ACCESS, OLD_REFRESH, *peers.issued, USER):
        assert secret.encode() not in exported


async def test_the_user_is_in_the_request_span_only_when_the_operator_allows_it(
    peers: Peers, proxy_factory: type[ProxyProcess], tmp_path: Path, salt: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": peers.otlp, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    proxy = await _proxy(proxy_factory, tmp_path, salt, peers, env, trace_user_ids=True)
    assert (await _call(proxy, {})).status_code == 200
    deadline = time.monotonic() + 15
    while not (forward := [s for s in peers.spans() if s.name == "forward"]):
        assert time.monotonic() < deadline, "no request span arrived"
        await asyncio.sleep(0.05)
    assert _attributes(forward[0])["enduser.id"] == USER
    # No agent traceparent: the request span is a root, and the upstream still gets its child.
    assert forward[0].parent_span_id == b""
    assert peers.upstream_headers[-1]["traceparent"].split("-")[1] == forward[0].trace_id.hex()


@pytest.mark.parametrize("off", [{}, {"OTEL_SDK_DISABLED": "true"}], ids=["unset", "sdk-disabled"])
async def test_with_tracing_off_nothing_is_exported_and_no_traceparent_added(
    peers: Peers, proxy_factory: type[ProxyProcess], tmp_path: Path, salt: str, off: dict[str, str]
) -> None:
    env = {**off, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    if off:  # an endpoint is set, but the SDK is switched off the standard way
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = peers.otlp
    proxy = await _proxy(proxy_factory, tmp_path, salt, peers, env)
    assert (await _call(proxy, {})).status_code == 200
    assert "traceparent" not in peers.upstream_headers[-1]
    agents = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"
    assert (await _call(proxy, {"traceparent": agents})).status_code == 200
    assert peers.upstream_headers[-1]["traceparent"] == agents  # passed on as any other header
    await asyncio.sleep(0.5)  # ten export intervals
    assert peers.exports == []


def test_an_endpoint_without_the_sdk_stops_the_proxy_before_it_listens(
    proxy_factory: type[ProxyProcess], tmp_path: Path
) -> None:
    # An installation without the otel extra: the SDK's package cannot be imported.
    shadow = tmp_path / "no-sdk" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("the otel extra is not installed")\n')
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(shadow.parent)}
    with pytest.raises(RuntimeError, match="did not start") as failed:
        proxy_factory({"servers": {}}, env)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT: set, but the OpenTelemetry SDK is not installed" in str(failed.value)
    assert "pip install 'keybearer[otel]'" in str(failed.value)
    assert "Traceback" not in str(failed.value)


async def test_a_consent_answer_is_named_by_its_code_never_by_its_link(
    peers: Peers, proxy_factory: type[ProxyProcess], tmp_path: Path, salt: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": peers.otlp, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    proxy = await _proxy(proxy_factory, tmp_path, salt, peers, env)
    stranger = "stranger-" + secrets.token_hex(4)
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            f"{proxy.url}/{stranger}/guarded/mcp",
            content=TOOLS_LIST,
            headers={"Content-Type": "application/json"},
        )
    (elicitation,) = answer.json()["error"]["data"]["elicitations"]  # the agent got its signed link
    signature = elicitation["url"].rsplit("sig=", 1)[1]
    deadline = time.monotonic() + 15
    while not (credential := [s for s in peers.spans() if s.name == "credential"]):
        assert time.monotonic() < deadline, "no credential span arrived"
        await asyncio.sleep(0.05)
    assert _attributes(credential[0])["error.type"] == "connection_required"
    assert credential[0].status.code == credential[0].status.STATUS_CODE_ERROR
    exported = b"".join(peers.exports)
    assert stranger.encode() not in exported
    assert signature.encode() not in exported


async def test_waiting_on_another_replicas_refresh_is_a_lock_wait_span(
    peers: Peers, proxy_factory: type[ProxyProcess], tmp_path: Path, salt: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": peers.otlp, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    proxy = await _proxy(proxy_factory, tmp_path, salt, peers, env)
    # Another replica (this test) holds the refresh lock, then writes what it got.
    store = SQLiteStore(str(tmp_path / "keybearer.db"))
    await store.open()
    try:
        lock = store.connection_lock(USER, "guarded")
        holder = await store.acquire_lock(lock, 30)
        assert holder is not None
        calling = asyncio.create_task(_call(proxy, {}))
        await asyncio.sleep(0.6)  # the proxy looks at the store every 0.25 s meanwhile
        assert not calling.done()
        fresh = "at-other-replica-" + secrets.token_urlsafe(8)
        peers.valid.add(fresh)
        await _store(store, salt, peers.origin, fresh, time.time() + 3600, version=2)
        await store.release_lock(lock, holder)
        assert (await calling).status_code == 200
    finally:
        await store.close()
    assert peers.issued == []  # the proxy made no token call of its own
    deadline = time.monotonic() + 15
    while not (refresh := [s for s in peers.spans() if s.name == "refresh"]):
        assert time.monotonic() < deadline, "no refresh span arrived"
        await asyncio.sleep(0.05)
    waits = [s for s in peers.spans() if s.name == "refresh lock wait"]
    assert waits and all(w.parent_span_id == refresh[0].span_id for w in waits)
    assert sum(w.end_time_unix_nano - w.start_time_unix_nano for w in waits) >= 0.4e9


async def test_the_connect_flow_traces_its_oauth_calls(
    peers: Peers, proxy_factory: type[ProxyProcess], tmp_path: Path, salt: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": peers.otlp, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    proxy = await _proxy(proxy_factory, tmp_path, salt, peers, env)
    person = "person-" + secrets.token_hex(4)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as browser:
        consent = await browser.post(
            f"/{person}/guarded/mcp", content=TOOLS_LIST, headers={"Content-Type": "application/json"}
        )
        link = consent.json()["error"]["data"]["elicitations"][0]["url"]
        page = await browser.get(link)
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match is not None, page.text
        begun = await browser.post(link, data={"csrf": match.group(1)})
        assert begun.status_code == 303, begun.text
        state = parse_qs(urlsplit(begun.headers["location"]).query)["state"][0]
        finished = await browser.get("/oauth/callback", params={"code": CODE, "state": state})
        assert finished.status_code == 200, finished.text
    deadline = time.monotonic() + 15
    while not {"connect begin", "connect finish"} <= {s.name for s in peers.spans()}:
        assert time.monotonic() < deadline, "the connect spans never arrived"
        await asyncio.sleep(0.05)
    spans = peers.spans()
    (begin,) = [s for s in spans if s.name == "connect begin"]
    (finish,) = [s for s in spans if s.name == "connect finish"]
    fetches = [s for s in spans if s.name == "oauth fetch"]
    under_begin = {_attributes(s)["url.full"] for s in fetches if s.parent_span_id == begin.span_id}
    assert f"{peers.origin}/.well-known/oauth-authorization-server" in under_begin
    under_finish = {_attributes(s)["url.full"]: s for s in fetches if s.parent_span_id == finish.span_id}
    exchange = under_finish[f"{peers.origin}/token"]
    assert _attributes(exchange)["http.response.status_code"] == 200
    assert _attributes(finish) == {"keybearer.server": "guarded"}
    exported = b"".join(peers.exports)
    for secret in (CODE, person, *peers.issued):
        assert secret.encode() not in exported
