"""A job left in the stream long past its deadline (no worker ran for that long) must not touch a new request
that has taken its client id since: the worker drops it without an event (worker/intake.py, STALE_JOB_S)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from structlog.testing import capture_logs

from gateway.validation import resolve
from protos import api, bus
from protos.keys import JOB_FIELD, STALE_JOB_S
from tests.conftest import running_stack, start_worker
from tests.streams import check_stream_shape, collect, greedy_request


async def leave_stale_job(stack, request_id: str) -> None:
    """The job a gateway enqueued under `request_id` and that no worker took before its deadline (+ slack) had
    passed: by then its claim on the id has expired, and the id is free for a new request."""
    generations = stack.gateway.generations
    resolved = resolve(greedy_request("def stale():", 4, request_id), generations.card, generations.config)
    long_ago = time.time() - STALE_JOB_S - 60
    job = bus.Job(
        request_id=request_id,
        reply_channel=generations.keys.gateway_channel("a-gateway-long-gone"),
        prompt_token_ids=resolved.prompt_token_ids,
        params=resolved.params,
        accepted_unix_ms=int((long_ago - 5) * 1000),
        deadline_unix_ms=int(long_ago * 1000),
        tokenizer_fingerprint=generations.card.tokenizer_fingerprint,
    )
    await generations.redis.xadd(generations.keys.jobs, {JOB_FIELD: job.SerializeToString()})


async def test_a_stale_job_does_not_take_over_a_new_request_under_its_id(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir, start_worker=False) as stack:
        redis, keys = stack.gateway.generations.redis, stack.gateway.generations.keys
        # 1. The stale job and the new request wait in the stream together (no worker yet): the worker reads
        # both at once. Before the fix, the new job was taken for a second delivery of the stale one, which
        # finished at once with DEADLINE: the new request ended DEADLINE_EXCEEDED without a token.
        await leave_stale_job(stack, "reused-id-1")
        new_request = asyncio.create_task(collect(stack.stub, greedy_request("def new():", 5, "reused-id-1")))
        await asyncio.sleep(0.3)
        with capture_logs() as logs:
            worker = start_worker(redis_url, demo_model_dir, stack.namespace)
            try:
                _ids, _text, finished = check_stream_shape(await asyncio.wait_for(new_request, 60))
                assert finished.stop_reason == api.STOP_REASON_LENGTH and finished.generated_tokens == 5
                # 2. The stale job comes first and alone. Before the fix it was finished (DEADLINE), which
                # logged an event under the id: the id then counted as taken while that log was kept (10
                # minutes), and the new request was refused with ALREADY_EXISTS.
                await leave_stale_job(stack, "reused-id-2")
                await asyncio.sleep(0.5)
                events = await collect(stack.stub, greedy_request("def new():", 5, "reused-id-2"))
                _ids, _text, finished = check_stream_shape(events)
                assert finished.stop_reason == api.STOP_REASON_LENGTH and finished.generated_tokens == 5
                assert worker.worker.counts["stale_dropped"] == 2
                assert await redis.xlen(keys.jobs) == 0  # acknowledged and deleted, none left to reclaim
            finally:
                worker.stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.task, 20)
                await worker.worker.redis.aclose()
        dropped = [e for e in logs if e["event"] == "stale_job_dropped"]
        assert {e["request_id"] for e in dropped} == {"reused-id-1", "reused-id-2"}
