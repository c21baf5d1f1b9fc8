"""The metrics endpoints move by the right amounts after a few requests (scraped over HTTP)."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codestream.redis_server import free_port
from protos import api
from tests.conftest import running_stack
from tests.streams import check_stream_shape, collect, greedy_request

PHASES = ("schedule", "launch", "gpu_wait", "outputs")
LOOP_PARTS = ("prepare", "step", "collect", "publish", "publish_wait", "rest")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_requests_tokens_and_latencies(redis_url: str, demo_model_dir: Path):
    gw_port, wk_port = free_port(), free_port()
    async with running_stack(
        redis_url, demo_model_dir, gateway={"metrics_port": gw_port}, worker={"metrics_port": wk_port}
    ) as stack:
        stack.worker.metrics.serve(wk_port)  # (the worker process does this in worker/main.py)
        before = scrape(wk_port)
        lengths = (("def a():", 5), ("def b():", 7), ("def c():", 9))
        requests = [greedy_request(p, n, ignore_eos=True) for p, n in lengths]
        chunks = []
        for r in requests:
            # (Chunks that waited for a slow reader are merged into one message: count tokens, not messages.)
            events = await collect(stack.stub, r)
            ids, _, _ = check_stream_shape(events)
            assert len(ids) == r.stopping.max_new_tokens
            chunks.append(len(events) - 2)  # token messages: all but Queued and Finished
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.stub.Generate(api.GenerateRequest(prompt=""))
        await asyncio.sleep(0.1)
        gw, wk = scrape(gw_port), scrape(wk_port)

    def get(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert get(gw, "codestream_gateway_requests_total", method="GenerateStream", code="OK") == 3
    assert get(gw, "codestream_gateway_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert get(gw, "codestream_gateway_time_to_first_token_seconds_count") == 3
    # One gap between each two token messages the gateway relayed (merged chunks are one message).
    assert get(gw, "codestream_gateway_inter_token_latency_seconds_count") == sum(n - 1 for n in chunks)
    assert get(gw, "codestream_gateway_request_duration_seconds_count") == 3
    assert get(gw, "codestream_gateway_queue_time_seconds_count") == 3
    assert get(gw, "codestream_gateway_active_streams") == 0
    assert (
        get(wk, "codestream_worker_generated_tokens_total") - get(before, "codestream_worker_generated_tokens_total")
        == 21
    )
    assert get(wk, "codestream_worker_requests_finished_total", reason="length") == 3
    assert get(wk, "codestream_worker_prompt_tokens_total") > 0
    assert get(wk, "codestream_worker_step_seconds_count") >= 9
    # Where the engine's time goes: its phases happen inside the steps the loop timed, and those inside the
    # loop turns that stepped it.
    phases = [get(wk, "codestream_worker_engine_host_seconds_total", phase=p) for p in PHASES]
    assert all(t > 0 for t in phases), phases
    stepped = get(wk, "codestream_worker_step_seconds_sum")
    loop = {part: get(wk, "codestream_worker_loop_seconds_total", part=part) for part in LOOP_PARTS}
    assert sum(phases) <= stepped * 1.01 + 1e-3
    assert loop["step"] == pytest.approx(stepped, rel=0.01, abs=1e-3)
    assert all(loop[part] > 0 for part in ("prepare", "collect", "publish", "rest")), loop
    assert get(wk, "codestream_worker_engine_steps_total") >= 9
    assert get(wk, "codestream_worker_engine_steps_ahead_total") >= 1  # (decode steps of one stream)
    assert get(wk, "codestream_worker_running_requests") == 0
