"""OpenTelemetry traces, off unless an OTLP endpoint is configured.

`configure` runs once, in `app.compose`: with no `OTEL_EXPORTER_OTLP_ENDPOINT`
(or `..._TRACES_ENDPOINT`) the functions below stay the no-ops defined here,
and a request pays one call to each and nothing else: no import of the SDK,
no environment lookup, no header added. Configured, they are rebound to the
SDK's: the OTLP/HTTP exporter behind a batch processor, the sampler and
resource from the standard `OTEL_*` variables, W3C `traceparent` in and out.

What a span carries is chosen here and nowhere else: server ids, MCP methods,
statuses, outcomes; never a token, and the user only with `trace_user_ids`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from starlette.types import Scope

from proxy.settings import ConfigError

Attributes = Mapping[str, str | int | float | bool]
Headers = list[tuple[bytes, bytes]]


class Facts(Protocol):
    """What the request span reports of forwarding.RequestFacts."""

    user: str | None
    server: str | None
    mcp_method: str | None
    status: int
    outcome: str


class Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> Any: ...


class _NoSpan:
    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(
    name: str, attributes: Attributes | None = None, *, client: bool = False
) -> contextlib.AbstractContextManager[Span]:
    """A child of the current span, current inside the `with`; `client` for a call out."""
    return _NO_SPAN


def request(scope: Scope, facts: Facts) -> contextlib.AbstractContextManager[Span]:
    """The span of one forwarded request, continuing the agent's traceparent;
    it reports `facts` as they are when the request ends."""
    return _NO_SPAN


def inject(headers: Headers) -> None:
    """Make the current span the upstream's parent: replaces any traceparent
    (and tracestate) in `headers`, the agent's included."""


def shutdown() -> None:
    """Export what is still buffered (at most a few seconds)."""


def _endpoint_variable(environ: Mapping[str, str]) -> str | None:
    """The variable that asks for traces, unless they are switched off the standard way."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if environ.get(name):
            return name
    return None


def configure(environ: Mapping[str, str], *, trace_user_ids: bool) -> bool:
    """Turn traces on when the environment asks for them; True if it did."""
    variable = _endpoint_variable(environ)
    if variable is None:
        return False
    try:
        from proxy import otel
    except ImportError:
        raise ConfigError(
            variable,
            "set, but the OpenTelemetry SDK is not installed: pip install 'keybearer[otel]', "
            "or unset it to run without traces",
        ) from None
    tracer = otel.Tracer(environ, trace_user_ids=trace_user_ids)
    _bind(tracer.span, tracer.request, tracer.inject, tracer.shutdown)
    return True


def reset() -> None:
    """Back to the no-ops, after shutdown."""
    _bind(*_NO_OPS)


def _bind(
    span_: Callable[..., Any],
    request_: Callable[..., Any],
    inject_: Callable[..., Any],
    shutdown_: Callable[[], None],
) -> None:
    global span, request, inject, shutdown
    span, request, inject, shutdown = span_, request_, inject_, shutdown_


_NO_OPS = (span, request, inject, shutdown)
