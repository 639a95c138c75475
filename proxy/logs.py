"""JSON logs through structlog, with a redaction processor in front of the renderer.

Redaction works three ways, because one alone leaks: keys that name a secret
are masked whatever their value; `Bearer …` and `Basic …` credentials are
masked wherever they appear; and every secret value the proxy has loaded
(API keys, tokens, the admin token) is registered here and masked verbatim.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"
# How late a served request's log line may reach the stream (the lines go out in batches).
SERVER_FLUSH_INTERVAL = 0.1
_SECRET_KEYS = re.compile(
    r"authorization|cookie|token|secret|password|passwd|api_?key|salt|credential|code_verifier|^code$",
    re.IGNORECASE,
)
_CREDENTIAL = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None
# A text shorter than every registered secret cannot hold one: most logged strings
# (ids, methods) are, and skip the pattern.
_shortest_known = 0


def register_secret(value: str | None) -> None:
    """Mask this exact value in every later log line."""
    # Called with the same API key on every request that reads it: known, it costs one lookup.
    if value and value not in _known:
        register_secrets((value,))


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these exact values in every later log line: the pattern is built once for all."""
    global _known_pattern, _shortest_known
    new = {v for v in values if v and len(v) >= 6 and v not in _known}
    if not new:
        return
    _known.update(new)
    _shortest_known = min(map(len, _known))
    try:
        _known_pattern = re.compile(_trie(_known))
    except (RecursionError, re.error):
        # Thousands of secrets each a prefix of the next would nest too deep: one long alternation.
        _known_pattern = re.compile("|".join(re.escape(v) for v in sorted(_known, key=len, reverse=True)))


def _trie(values: Iterable[str]) -> str:
    """One regex matching any of `values`, longest first, with common prefixes factored out.

    A plain alternation of N secrets tries each at every position of every logged string:
    its cost per line grew with the number of keys (0.4 us per string with 2 keys, 212 us
    with 2,000). Factored, a position is rejected on its first characters whatever N is
    (2.2 us with 2,000).
    """
    root: dict[str, Any] = {}
    for value in values:
        node = root
        for char in value:
            node = node.setdefault(char, {})
        node[""] = {}  # a value ends here

    def alternatives(node: dict[str, Any]) -> str:
        branches = []
        for char, child in node.items():
            if not char:
                continue
            run = [char]
            while len(child) == 1 and "" not in child:  # a chain without branches: one literal
                ((char, child),) = child.items()
                run.append(char)
            branches.append(re.escape("".join(run)) + alternatives(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # A value that ends here is matched only when no longer one does (greedy `?`).
        return f"(?:{body})?" if "" in node else body

    return alternatives(root)


def redact_text(text: str) -> str:
    # "Bearer <x>" needs whitespace: most logged strings (ids, methods) have none,
    # and this runs for every field of every request line.
    if " " in text or "\t" in text or "\n" in text:
        text = _CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if _known_pattern is not None and len(text) >= _shortest_known:
        text = _known_pattern.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    return bool(_SECRET_KEYS.search(key))


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the last stop before rendering."""
    for key, value in list(event_dict.items()):
        if key != "event" and _secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str | dict | list | tuple):
            event_dict[key] = _redact(value)
    return event_dict


class LineWriter:
    """Writes whole log lines to a stream, in order.

    Request lines, written on the event loop, may wait up to `interval` and go
    out together in one write: a write and flush per request was a measurable
    share of the forwarding path's CPU (docs/performance.md). Every other line
    goes out at once, behind those waiting, so that start-up, shutdown and error
    lines are never held back, even by a process that exits on a signal.
    """

    def __init__(self, stream: TextIO, interval: float = 0.0) -> None:
        self.stream = stream
        self.interval = interval
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def write(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
        self.flush()

    def write_later(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop() if self.interval else None
            except RuntimeError:
                loop = None
            if loop is not None:
                self._scheduled = True
                loop.call_later(self.interval, self.flush)
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._scheduled = self._lines, [], False
        if lines:
            with contextlib.suppress(ValueError, OSError):  # a stream closed at exit
                self.stream.write("".join(lines))
                self.stream.flush()


class _StructlogWriter:
    """structlog's logger: every level's rendered line goes to the current LineWriter
    (looked up per line: structlog caches loggers across a later configure())."""

    def msg(self, message: str) -> None:
        _writer.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_writer = LineWriter(sys.stdout)
_request_lines = True


def request(
    *,
    request_id: str,
    user: str | None = None,
    server: str | None = None,
    method: str | None = None,
    mcp_method: str | None = None,
    status: int = 0,
    outcome: str = "ok",
    duration_ms: float = 0.0,
    bytes_in: int = 0,
    bytes_out: int = 0,
) -> None:
    """The one line per forwarded request, without structlog's processor chain.

    Same shape as every other line. Its fields are the proxy's own (validated
    ids, numbers, an outcome code) except `mcp_method`, which the agent chose
    and which is redacted like any text. Written out by hand rather than by
    `json.dumps` of a dict (a third of this line's cost): every string still
    goes through the JSON encoder's own escaping.
    """
    if not _request_lines:
        return
    global _second, _second_text
    # The microseconds since the epoch: their last six digits are the timestamp's fraction.
    now = str(time.time_ns() // 1000)
    if now[:-6] != _second:
        _second = now[:-6]
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(_second)))
    # Inline rather than a helper per field: this runs for every request. Numbers
    # without a format spec: `{n:d}` parses its spec on every call.
    _writer.write_later(
        f'{{"request_id": {_encode_str(request_id)}, '
        f'"user": {"null" if user is None else _encode_str(user)}, '
        f'"server": {"null" if server is None else _encode_str(server)}, '
        f'"method": {"null" if method is None else _encode_str(method)}, '
        f'"mcp_method": {"null" if mcp_method is None else _encode_str(redact_text(mcp_method))}, '
        f'"status": {status}, "outcome": {_encode_str(outcome)}, "duration_ms": {duration_ms!r}, '
        f'"bytes_in": {bytes_in}, "bytes_out": {bytes_out}, "event": "request", "level": "info", '
        f'"timestamp": "{_second_text}.{now[-6:]}Z"}}\n'
    )


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for every str
# The timestamp is UTC, ISO 8601 with microseconds and a Z, as structlog's lines; the
# date and time of day are formatted once per second.
_second = ""
_second_text = ""


def flush() -> None:
    _writer.flush()


atexit.register(flush)


def configure(level: str = "info", stream: TextIO | None = None, flush_interval: float = 0.0) -> None:
    """Lines go to `stream` (stdout); `flush_interval` > 0 batches them (the server)."""
    global _writer, _request_lines
    stream = stream or sys.stdout
    _writer.flush()
    _writer = LineWriter(stream, flush_interval)
    numeric = logging.getLevelName(level.upper())
    _request_lines = numeric <= logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _StructlogWriter(),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library end up in the same stream,
    # in order, through the same redaction.
    handler = _StdlibHandler()
    handler.setFormatter(_StdlibJSON())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric < logging.INFO else numeric)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).disabled = True


class _StdlibHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _writer.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _StdlibJSON(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(redact(None, "", event))
