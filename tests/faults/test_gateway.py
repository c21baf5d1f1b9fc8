"""Gateway fault with real processes (case 4): kill -9 the gateway a client streams from; the client resumes
through another gateway and gets the rest of its stream exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from protos import api
from tests.faults.conftest import (
    PROMPTS,
    Cluster,
    Reference,
    Stream,
    assert_exactly_once,
    consume,
    covered_seqs,
    generate_request,
    open_stream,
    wait_for,
)


async def test_kill_9_gateway_mid_stream_client_resumes_through_another_exactly_once(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    n_streams, max_new = 4, 300
    prompts = PROMPTS[:n_streams]
    worker = cluster.start_worker("worker")
    doomed, other = cluster.start_gateway("gateway-a"), cluster.start_gateway("gateway-b")
    await cluster.ready(worker, doomed, other)

    calls = [open_stream(cluster.stub(doomed), generate_request(p, max_new), timeout_s=60) for p in prompts]
    first: list[Stream] = [s for s, _, _ in calls]
    await wait_for(lambda: all(len(s.chunks) >= 10 for s in first), what="10 chunks on every stream")
    killed_at = time.monotonic()
    doomed.kill()
    await asyncio.gather(*(task for _, task, _ in calls))
    noticed_at = max(s.ended for s in first)
    for stream in first:
        assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.details)

    stub = cluster.stub(other)
    rest = [Stream(started=time.monotonic()) for _ in first]
    await asyncio.gather(
        *(
            consume(stub.Resume(api.ResumeRequest(request_id=s.request_id, after_seq=s.last_seq), timeout=60), r)
            for s, r in zip(first, rest, strict=True)
        )
    )
    for i, (before, after, want) in enumerate(zip(first, rest, reference.tokens(prompts, max_new), strict=True)):
        assert after.code == grpc.StatusCode.OK, (after.code, after.details)
        assert covered_seqs(after.events[0]).start == before.last_seq + 1
        assert_exactly_once(before.events + after.events, want, f"stream {i}")

    figure("kill_to_client_error", noticed_at - killed_at, "s")
    figure("kill_to_first_resumed_event", min(r.arrivals[0] for r in rest) - killed_at, "s")
    figure("kill_to_all_streams_done", max(r.ended for r in rest) - killed_at, "s")
    figure("events_before_kill", sum(s.last_seq for s in first))
