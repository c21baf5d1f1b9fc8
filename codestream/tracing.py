"""OpenTelemetry spans where the OpenTelemetry API is installed (`pip install codestream[otel]`); nothing
where it is not.

The client's W3C `traceparent` (gRPC metadata or HTTP header) already travels with the job through Redis
to the worker and into every lifecycle log line. With OpenTelemetry installed and a tracer provider set up
(most simply by starting the process under `opentelemetry-instrument`, which reads the standard `OTEL_*`
variables), the gateway records one span per request, `codestream.request`, as a child of the client's
trace, and the worker one per attempt at a job, `codestream.generate`, as a child of the gateway's span
(the job carries the gateway span's traceparent). Without a configured provider the API hands out
non-recording spans; without the package, `start()` returns None and every call here returns at once.
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the optional extra is not installed: tracing costs nothing
    trace = None

_tracer = trace.get_tracer("codestream") if trace is not None else None
_propagator = TraceContextTextMapPropagator() if trace is not None else None


def start(
    name: str, traceparent: str = "", server: bool = True, start_time_ns: int | None = None, **attributes: Any
) -> Any:
    """A started span, child of `traceparent` when one is given (else a new trace); None without
    OpenTelemetry. End it with end(). start_time_ns: when it began, if earlier than now."""
    if _tracer is None:
        return None
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    kind = SpanKind.SERVER if server else SpanKind.CONSUMER
    return _tracer.start_span(name, context=parent, kind=kind, attributes=_clean(attributes), start_time=start_time_ns)


def traceparent_of(span: Any, fallback: str = "") -> str:
    """The W3C traceparent that makes the next hop a child of `span` (`fallback` when it records nothing)."""
    if span is None or not span.get_span_context().is_valid:
        return fallback
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", fallback)


def end(span: Any, error: str = "", **attributes: Any) -> None:
    """Set the outcome's attributes and end the span (an error message marks it failed)."""
    if span is None:
        return
    span.set_attributes(_clean(attributes))
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int and float values only; None means "not known"."""
    return {f"codestream.{k}": v for k, v in attributes.items() if v is not None}
