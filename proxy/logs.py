"""JSON logs through structlog, with a redaction processor in front of the renderer.

Redaction works three ways, because one alone leaks: keys that name a secret
are masked whatever their value; `Bearer …` and `Basic …` credentials are
masked wherever they appear; and every secret value the proxy has loaded
(API keys, tokens, the admin token) is registered here and masked verbatim.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"
_SECRET_KEYS = re.compile(
    r"authorization|cookie|token|secret|password|passwd|api_?key|salt|credential|code_verifier|^code$",
    re.IGNORECASE,
)
_CREDENTIAL = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Mask this exact value in every later log line."""
    global _known_pattern
    if not value or len(value) < 6 or value in _known:
        return
    _known.add(value)
    _known_pattern = re.compile("|".join(re.escape(v) for v in sorted(_known, key=len, reverse=True)))


def redact_text(text: str) -> str:
    # "Bearer <x>" needs whitespace: most logged strings (ids, methods) have none,
    # and this runs for every field of every request line.
    if " " in text or "\t" in text or "\n" in text:
        text = _CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if _known_pattern is not None:
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


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    numeric = logging.getLevelName(level.upper())
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
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library end up in the same stream,
    # through the same redaction.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_StdlibJSON())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric < logging.INFO else numeric)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).disabled = True


class _StdlibJSON(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        event: dict[str, Any] = {
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(redact(None, "", event))
