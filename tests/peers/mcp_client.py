"""Test helpers: run the SDK test upstream (``mcp_upstream.py``) and talk MCP to a URL.

Upstream process (sync context manager, fine in sync or async pytest fixtures)::

    with run_upstream("streamable-http", json_response=False) as up:   # or "sse"
        up.mcp_url          # http://127.0.0.1:<port>/mcp   (sse: .../sse)
        up.base_url         # http://127.0.0.1:<port>
        up.stats()          # GET /_stats -> dict (open_connections, open_requests, ...)

MCP sessions (``ClientSession`` already initialized with the legacy ``initialize`` handshake,
so streamable HTTP gets an ``Mcp-Session-Id`` and a standalone GET stream)::

    rec = Recorder()
    async with streamable_session(url, headers={"Authorization": "Bearer t"}, recorder=rec) as session:
        result = await session.call_tool("echo", {"text": "hi"})
        text = result_text(result)                       # "hi"
        seen = json.loads(result_text(await session.call_tool("headers", {})))
        await session.call_tool("notify", {"message": "ping"})   # -> standalone GET stream
        params = await rec.wait_log("ping")                # LoggingMessageNotificationParams
        rec.session_id                                     # Mcp-Session-Id (sse: the session_id query value)

    async with sse_session(url_of_sse_endpoint, headers=..., recorder=rec) as session: ...

Notifications: every server notification goes to ``Recorder.notifications`` (via the
session's ``message_handler``; log messages also arrive there as
``LoggingMessageNotification``), ``Recorder.wait_for(predicate)`` / ``wait_log(data)`` block
until one matches. Pass ``message_handler=`` / ``logging_callback=`` to ``ClientSession``
yourself if you need something else.

Termination: ``streamable_session`` sends ``DELETE <url>`` with the session id on exit
(``terminate_on_close=True``, failures are only logged). Mid-test, ``delete_session(url,
session_id)`` sends a raw DELETE and returns the HTTP status (200 on success, 404 if unknown).
Legacy sse has no DELETE; the session ends when the GET /sse stream closes.

Expired/unknown session (streamable HTTP): the SDK server answers 404 with a JSON-RPC error
body ``{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}``.
The client turns that body into the request's error, so ``session.call_tool(...)`` raises
``mcp.shared.exceptions.MCPError`` with ``.code == -32600`` (INVALID_REQUEST) and
``.error.message == "Session not found"``. (If a 404 has no JSON-RPC JSON body, the client
synthesizes ``MCPError(-32600, "Session terminated")`` instead; before a session id exists a
bare 404 becomes ``-32601 "Not Found"``.) Use ``raw_post(url, payload, session_id=...)`` to
see the HTTP status itself. Legacy sse: the message POST gets a plain-text 404 "Could not find
session"; the SDK client logs "Error in post_writer", its writer dies and the pending and all
later requests raise ``MCPError`` with ``.code == -32000`` (CONNECTION_CLOSED, "Connection
closed"), so check the 404 itself at the HTTP level with a raw POST to ``/messages/?session_id=``.

Protocol eras: ``mode="legacy"`` (default) is the pre-2026 handshake every proxy test wants.
Against this SDK server ``mode="auto"`` negotiates 2026-07-28: no Mcp-Session-Id, no GET stream,
no standalone notifications, logs only with ``ClientSession(log_level=...)`` opt-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
import mcp_types as types
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from peers import process

UPSTREAM_SCRIPT = Path(__file__).with_name("mcp_upstream.py")
Transport = Literal["streamable-http", "sse"]
Mode = Literal["legacy", "auto"]
# SSE streams may idle for a long time; everything else should be quick in tests.
DEFAULT_TIMEOUT = httpx2.Timeout(10.0, read=300.0)
JSON_AND_SSE = "application/json, text/event-stream"


# --------------------------------------------------------------------------- upstream process


@dataclass
class Upstream:
    """A running ``mcp_upstream.py`` subprocess."""

    transport: Transport
    port: int
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)  # stdout lines after READY

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        """``/mcp`` for streamable HTTP, ``/sse`` (the GET endpoint) for legacy sse."""
        return self.base_url + ("/mcp" if self.transport == "streamable-http" else "/sse")

    def stats(self) -> dict[str, Any]:
        """``GET /_stats`` (blocking; use ``await anyio.to_thread.run_sync(up.stats)`` if needed)."""
        with urllib.request.urlopen(self.base_url + "/_stats", timeout=5) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
        return stats

    async def astats(self) -> dict[str, Any]:
        async with httpx2.AsyncClient(timeout=5) as client:
            stats: dict[str, Any] = (await client.get(self.base_url + "/_stats")).json()
        return stats


@contextlib.contextmanager
def run_upstream(
    transport: Transport = "streamable-http",
    *,
    json_response: bool = False,
    stateless: bool = False,
    port: int = 0,
    session_idle_timeout: float | None = None,
    allowed_hosts: Sequence[str] = (),
    no_host_check: bool = False,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 20.0,
) -> Iterator[Upstream]:
    """Start ``mcp_upstream.py`` on a free port, wait for its ``READY <port>`` line, stop on exit.

    stderr is inherited (pytest's fd capture shows it on failure). Stop = SIGTERM, then
    SIGKILL after 5 s.
    """
    cmd = [sys.executable, str(UPSTREAM_SCRIPT), "--transport", transport, "--port", str(port)]
    cmd.append("--exit-on-stdin-eof")  # no orphan if this process is killed without cleanup
    if json_response:
        cmd.append("--json-response")
    if stateless:
        cmd.append("--stateless")
    if session_idle_timeout is not None:
        cmd += ["--session-idle-timeout", str(session_idle_timeout)]
    for host in allowed_hosts:
        cmd += ["--allowed-host", host]
    if no_host_check:
        cmd.append("--no-host-check")
    cmd += list(extra_args)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        upstream = Upstream(transport, int(process.wait_ready(proc, startup_timeout)[0]), proc)
        process.drain(proc, upstream.output)
        yield upstream
    finally:
        process.stop(proc)


# --------------------------------------------------------------------------- MCP sessions


@dataclass
class Recorder:
    """Collects what a session saw: server notifications and the session id."""

    notifications: list[types.ServerNotification] = field(default_factory=list)
    transport_errors: list[Exception] = field(default_factory=list)
    session_id: str | None = None
    # Created lazily: anyio.Event() needs a running event loop.
    _changed: anyio.Event | None = field(default=None, repr=False)

    async def message_handler(self, message: types.ServerNotification | Exception) -> None:
        if isinstance(message, Exception):
            self.transport_errors.append(message)
        else:
            self.notifications.append(message)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for(
        self, predicate: Callable[[types.ServerNotification], bool], timeout: float = 5.0
    ) -> types.ServerNotification:
        """First recorded notification (past or future) matching ``predicate``; TimeoutError otherwise."""
        with anyio.fail_after(timeout):
            while True:
                for note in self.notifications:
                    if predicate(note):
                        return note
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    async def wait_log(
        self, data: Any = None, timeout: float = 5.0
    ) -> types.LoggingMessageNotificationParams:
        """First ``notifications/message`` (optionally with ``params.data == data``)."""
        note = await self.wait_for(
            lambda n: (
                isinstance(n, types.LoggingMessageNotification) and (data is None or n.params.data == data)
            ),
            timeout,
        )
        assert isinstance(note, types.LoggingMessageNotification)
        return note.params

    def logs(self) -> list[Any]:
        return [n.params.data for n in self.notifications if isinstance(n, types.LoggingMessageNotification)]


async def _start_session(session: ClientSession, mode: Mode) -> None:
    if mode == "legacy":
        await session.initialize()
    else:
        # The same server/discover probe + initialize fallback `mcp.Client` does (private API).
        from mcp.client._probe import negotiate_auto

        await negotiate_auto(session)


@contextlib.asynccontextmanager
async def streamable_session(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    recorder: Recorder | None = None,
    mode: Mode = "legacy",
    terminate_on_close: bool = True,
    read_timeout: float | None = 15.0,
    timeout: httpx2.Timeout = DEFAULT_TIMEOUT,
) -> AsyncIterator[ClientSession]:
    """Initialized ``ClientSession`` over streamable HTTP at ``url`` (e.g. ``.../mcp``).

    ``headers`` go on every request (POST, GET stream, DELETE). ``mode="legacy"`` (default)
    runs ``initialize`` -> stateful session + GET stream; ``mode="auto"`` first tries
    ``server/discover`` (protocol 2026-07-28, no session, no GET stream) like ``mcp.Client``.
    ``read_timeout`` bounds each request so a broken path fails instead of hanging.
    """
    rec = recorder if recorder is not None else Recorder()

    async def capture_session_id(response: httpx2.Response) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid and response.request.method == "POST":
            rec.session_id = sid

    async with (
        httpx2.AsyncClient(
            headers=dict(headers or {}), timeout=timeout, event_hooks={"response": [capture_session_id]}
        ) as http,
        streamable_http_client(url, http_client=http, terminate_on_close=terminate_on_close) as (read, write),
        ClientSession(
            read, write, read_timeout_seconds=read_timeout, message_handler=rec.message_handler
        ) as session,
    ):
        await _start_session(session, mode)
        yield session


@contextlib.asynccontextmanager
async def sse_session(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    recorder: Recorder | None = None,
    read_timeout: float | None = 15.0,
    timeout: float = 10.0,
) -> AsyncIterator[ClientSession]:
    """Initialized ``ClientSession`` over the legacy HTTP+SSE transport; ``url`` is the GET
    endpoint (``.../sse``). The server announces ``/messages/?session_id=<hex>`` and the
    client POSTs there (same origin enforced by the SDK client)."""
    rec = recorder if recorder is not None else Recorder()

    def on_session_created(session_id: str) -> None:
        rec.session_id = session_id

    async with (
        sse_client(
            url, headers=dict(headers or {}), timeout=timeout, on_session_created=on_session_created
        ) as (
            read,
            write,
        ),
        ClientSession(
            read, write, read_timeout_seconds=read_timeout, message_handler=rec.message_handler
        ) as session,
    ):
        await session.initialize()
        yield session


def result_text(result: types.CallToolResult) -> str:
    """Concatenated text content of a tool result."""
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


# --------------------------------------------------------------------------- raw HTTP


def jsonrpc(method: str, params: Mapping[str, Any] | None = None, id: int | str | None = 1) -> dict[str, Any]:
    """A JSON-RPC request (or notification when ``id`` is None)."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = dict(params)
    if id is not None:
        msg["id"] = id
    return msg


INITIALIZE = jsonrpc(
    "initialize",
    {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
)


async def raw_post(
    url: str,
    payload: Mapping[str, Any],
    *,
    session_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    protocol_version: str | None = "2025-06-18",
) -> httpx2.Response:
    """One raw streamable-HTTP POST (body read). E.g. unknown session::

    r = await raw_post(url, jsonrpc("tools/list"), session_id="0" * 32)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Session not found"
    """
    h = {"accept": JSON_AND_SSE, "content-type": "application/json", **(headers or {})}
    if session_id is not None:
        h["mcp-session-id"] = session_id
    if protocol_version is not None:
        h["mcp-protocol-version"] = protocol_version
    async with httpx2.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
        return await client.post(url, json=dict(payload), headers=h)


async def delete_session(url: str, session_id: str, headers: Mapping[str, str] | None = None) -> int:
    """Raw ``DELETE <url>`` with ``Mcp-Session-Id``; returns the HTTP status (200 ok, 404 unknown)."""
    h = {"mcp-session-id": session_id, "mcp-protocol-version": "2025-06-18", **(headers or {})}
    async with httpx2.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
        return (await client.delete(url, headers=h)).status_code
