"""The OpenTelemetry SDK behind proxy/tracing.py, imported only when traces are on.

The SDK reads the standard variables itself: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT,
_HEADERS and _TIMEOUT for the exporter, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* for
the batch, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES for the resource.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import Scope

from proxy.errors import KeybearerError

if TYPE_CHECKING:
    from proxy.tracing import Attributes, Facts, Headers

_PROPAGATED = (b"traceparent", b"tracestate")


class Tracer:
    def __init__(self, environ: Mapping[str, str], *, trace_user_ids: bool) -> None:
        named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        resource = Resource.create({} if named else {"service.name": "keybearer"})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("keybearer")
        self.propagator = TraceContextTextMapPropagator()
        self.trace_user_ids = trace_user_ids

    @contextlib.contextmanager
    def span(
        self, name: str, attributes: Attributes | None = None, *, client: bool = False
    ) -> Iterator[Span]:
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        with self._started(name, kind, attributes) as span:
            yield span

    @contextlib.contextmanager
    def request(self, scope: Scope, facts: Facts) -> Iterator[Span]:
        parent = self._extract(scope["headers"])
        attributes = {"http.request.method": scope["method"]}
        with self._started("forward", SpanKind.SERVER, attributes, parent) as span:
            try:
                yield span
            finally:
                self._report(span, facts)

    @contextlib.contextmanager
    def _started(
        self, name: str, kind: SpanKind, attributes: Attributes | None, parent: Context | None = None
    ) -> Iterator[Span]:
        # Not the SDK's exception recording: a message may hold what a trace must not
        # (a consent answer's signed link, a user id), so a failure is named by its type.
        with self.tracer.start_as_current_span(
            name, parent, kind, attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except BaseException as exc:
                code = exc.code if isinstance(exc, KeybearerError) else type(exc).__name__
                span.set_attribute("error.type", code)
                span.set_status(Status(StatusCode.ERROR))
                raise

    def _report(self, span: Span, facts: Facts) -> None:
        if facts.server is not None:
            span.set_attribute("keybearer.server", facts.server)
        if facts.mcp_method is not None:
            span.set_attribute("mcp.method.name", facts.mcp_method)
        if facts.user is not None and self.trace_user_ids:
            span.set_attribute("enduser.id", facts.user)
        span.set_attribute("http.response.status_code", facts.status)
        span.set_attribute("keybearer.outcome", facts.outcome)
        if facts.status >= 500 or facts.status == 0:
            span.set_status(Status(StatusCode.ERROR, facts.outcome))

    def _extract(self, headers: Headers) -> Context | None:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name in _PROPAGATED
        }
        return self.propagator.extract(carrier) if carrier else None

    def inject(self, headers: Headers) -> None:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        if carrier:
            headers[:] = [(name, value) for name, value in headers if name not in _PROPAGATED]
            headers.extend((name.encode(), value.encode("latin-1")) for name, value in carrier.items())

    def shutdown(self) -> None:
        self.provider.shutdown()
