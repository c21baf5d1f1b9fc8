"""OpenTelemetry spans (where the optional extra is installed): the gateway's request span is a child of
the client's traceparent, the worker's generate span a child of the gateway's, both in the client's trace,
with the outcome on them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from protos import api
from tests.conftest import running_stack

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: codestream's tracer is a proxy to the global one
    return exporter


async def wait_for_spans(exporter: InMemorySpanExporter, names: set[str], timeout_s: float = 10) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = exporter.get_finished_spans()
        if names <= {s.name for s in finished}:
            return list(finished)
        await asyncio.sleep(0.05)
    raise AssertionError(f"spans {names} not all ended: {[s.name for s in exporter.get_finished_spans()]}")


async def test_spans_follow_the_client_trace_through_redis_to_the_worker(
    spans: InMemorySpanExporter, redis_url: str, demo_model_dir: Path
):
    request = api.GenerateRequest(prompt="def trace(x):", stopping=api.StoppingCriteria(max_new_tokens=5))
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
    async with running_stack(redis_url, demo_model_dir) as stack:
        spans.clear()
        events = [e async for e in stack.stub.GenerateStream(request, metadata=(("traceparent", traceparent),))]
        assert events[-1].finished.generated_tokens == 5
        ended = await wait_for_spans(spans, {"codestream.request", "codestream.generate"})
        (gateway,) = [s for s in ended if s.name == "codestream.request"]
        (worker,) = [s for s in ended if s.name == "codestream.generate"]
        assert f"{gateway.context.trace_id:032x}" == TRACE_ID == f"{worker.context.trace_id:032x}"
        assert f"{gateway.parent.span_id:016x}" == CLIENT_SPAN_ID
        assert worker.parent.span_id == gateway.context.span_id
        assert gateway.attributes["codestream.finished"] is True and gateway.status.is_ok
        assert gateway.attributes["codestream.events"] == events[-1].seq
        assert worker.attributes["codestream.generated_tokens"] == 5
        assert worker.attributes["codestream.stop_reason"] == "STOP_REASON_LENGTH"

        # No traceparent: a trace of its own, still gateway -> worker.
        spans.clear()
        await stack.stub.Generate(request)
        ended = await wait_for_spans(spans, {"codestream.request", "codestream.generate"})
        (gateway,) = [s for s in ended if s.name == "codestream.request"]
        (worker,) = [s for s in ended if s.name == "codestream.generate"]
        assert f"{gateway.context.trace_id:032x}" != TRACE_ID and gateway.parent is None
        assert worker.parent.span_id == gateway.context.span_id

        # A client that leaves mid-stream: the request span says so, as an error.
        spans.clear()
        long = api.GenerateRequest(prompt="x", stopping=api.StoppingCriteria(max_new_tokens=500, ignore_eos=True))
        call = stack.stub.GenerateStream(long)
        async for event in call:
            if event.HasField("tokens"):
                break
        call.cancel()
        ended = await wait_for_spans(spans, {"codestream.request", "codestream.generate"})
        (gateway,) = [s for s in ended if s.name == "codestream.request"]
        assert not gateway.status.is_ok and gateway.status.description == "client left"
        assert gateway.attributes["codestream.finished"] is False
        (worker,) = [s for s in ended if s.name == "codestream.generate"]
        assert worker.attributes["codestream.stop_reason"] == "STOP_REASON_CANCELLED"


def test_without_opentelemetry_every_call_is_a_no_op(monkeypatch):
    from codestream import tracing

    monkeypatch.setattr(tracing, "_tracer", None)  # as when the import failed
    span = tracing.start("codestream.request", f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01", request_id="r")
    assert span is None
    assert tracing.traceparent_of(span, "kept") == "kept"
    tracing.end(span, error="ignored")
