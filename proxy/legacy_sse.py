"""The legacy HTTP+SSE transport (MCP 2024-11-05): rewriting its `endpoint` event.

A legacy server opens its GET stream with `event: endpoint` whose data is the
URL the client must POST messages to. That URL points at the upstream; the
agent must see one under `/<user>/<server>/` instead. Only the first event can
be the endpoint, so only the first event is parsed; after it, chunks pass
through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from proxy.bounded import BoundedMap
from proxy.errors import UpstreamFailed
from proxy.settings import MCP_ALIAS, UPSTREAM_PATH_PATTERN, ServerConfig

MAX_FIRST_EVENT = 64 * 1024
# Message endpoints remembered per server: a server announces one path (plus a
# session query); a hostile one must not grow the proxy's memory.
MAX_ANNOUNCED_PATHS = 16
# Servers whose announced paths are kept; one that falls out announces again on its next stream.
MAX_ANNOUNCING_SERVERS = 4096
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(r"\r\n|\n|\r")


class ForeignEndpoint(UpstreamFailed):
    """The server announced an endpoint outside its own origin."""

    code = "foreign_endpoint_refused"


class AnnouncedPaths:
    """The message endpoints legacy servers announced: reachable through the proxy
    besides the server's own URL. Bound to the definition of the server that
    announced them: once it changes, they are no longer reachable."""

    def __init__(self) -> None:
        self._paths: BoundedMap[str, tuple[ServerConfig, frozenset[str]]] = BoundedMap(MAX_ANNOUNCING_SERVERS)

    def get(self, server: ServerConfig) -> frozenset[str]:
        entry = self._paths.get(server.id)
        if entry is None or not (entry[0] is server or entry[0] == server):
            return frozenset()
        return entry[1]

    def note(self, server: ServerConfig, path: str) -> None:
        known = self.get(server)
        if path not in known and len(known) < MAX_ANNOUNCED_PATHS:
            self._paths[server.id] = (server, known | {path})


class EndpointRewriter:
    def __init__(
        self,
        server: ServerConfig,
        upstream_url: str,
        proxy_prefix: str,
        proxy_origin: str,
        on_announce: Callable[[str], None],
    ) -> None:
        self.server = server
        self.upstream_url = upstream_url
        self.proxy_prefix = proxy_prefix
        self.proxy_origin = proxy_origin
        self.on_announce = on_announce
        self.done = False
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to relay now for this chunk (possibly none while the first event is incomplete)."""
        if self.done:
            return chunk
        self._buffer += chunk
        out = b""
        while not self.done:
            # Only the first MAX_FIRST_EVENT bytes of an event are looked at, so
            # that the outcome does not depend on how the stream was chunked.
            match = _EVENT_END.search(self._buffer, 0, MAX_FIRST_EVENT)
            if match is None:
                if len(self._buffer) >= MAX_FIRST_EVENT:
                    self._refuse_long_endpoint()
                    self.done = True  # too long to be parsed: relayed as it is
                    out, self._buffer = out + self._buffer, b""
                return out
            block, self._buffer = self._buffer[: match.end()], self._buffer[match.end() :]
            out += self._event(block)
        out, self._buffer = out + self._buffer, b""
        return out

    def _event(self, block: bytes) -> bytes:
        text = block.decode("utf-8", errors="replace")
        lines = [line for line in _LINE_END.split(text) if line]
        fields = [line for line in lines if not line.startswith(":")]
        if not fields:
            return block  # keep-alive comments before the first event
        self.done = True
        event = next((_value(f) for f in fields if f.split(":", 1)[0] == "event"), "message")
        if event != "endpoint":
            return block
        data = "".join(_value(f) for f in fields if f.split(":", 1)[0] == "data")
        comments = "".join(line + "\n" for line in lines if line.startswith(":"))
        return f"{comments}event: endpoint\ndata: {self.rewrite(data)}\n\n".encode()

    def _refuse_long_endpoint(self) -> None:
        head = self._buffer[:MAX_FIRST_EVENT].decode("utf-8", errors="replace")
        lines = _LINE_END.split(head)[:-1]  # the last one may be cut short
        if any(line.split(":", 1)[0] == "event" and _value(line) == "endpoint" for line in lines):
            raise ForeignEndpoint(
                f"server {self.server.id!r} announced its message endpoint in an event longer than "
                f"{MAX_FIRST_EVENT} bytes; refused"
            )

    def rewrite(self, announced: str) -> str:
        try:
            target = urlsplit(urljoin(self.upstream_url, announced.strip()))
        except ValueError:  # such as an unclosed IPv6 bracket
            raise ForeignEndpoint(
                f"server {self.server.id!r} announced a message endpoint that is not a URL"
            ) from None
        if f"{target.scheme}://{target.netloc}" != self.server.origin:
            raise ForeignEndpoint(
                f"server {self.server.id!r} announced a message endpoint on another origin "
                f"({target.scheme}://{target.netloc}); refused"
            )
        path = target.path or "/"
        if not UPSTREAM_PATH_PATTERN.fullmatch(path) or any(s in (".", "..") for s in path.split("/")):
            raise ForeignEndpoint(f"server {self.server.id!r} announced an unusable message path {path!r}")
        if path == self.server.path:
            rewritten = self.proxy_prefix
        elif path == MCP_ALIAS:
            # Under the proxy, /<user>/<server>/mcp is the MCP endpoint: messages
            # sent there would never reach this path.
            raise ForeignEndpoint(
                f"server {self.server.id!r} announced /mcp as its message endpoint, which the proxy "
                "keeps for the MCP endpoint; refused"
            )
        else:
            self.on_announce(path)
            rewritten = self.proxy_prefix + path
        if target.query:
            rewritten += "?" + target.query
        if urlsplit(announced.strip()).scheme:
            rewritten = self.proxy_origin + rewritten
        return rewritten


def _value(field: str) -> str:
    _, _, value = field.partition(":")
    return value[1:] if value.startswith(" ") else value
