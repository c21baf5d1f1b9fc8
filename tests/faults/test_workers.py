"""Worker faults with real processes: kill -9 (case 1), SIGSTOP past the lease (case 2), SIGTERM drain (case 3)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc

from tests.faults.conftest import (
    PROMPTS,
    Cluster,
    Process,
    Reference,
    Stream,
    assert_exactly_once,
    generate_request,
    open_stream,
    wait_for,
)


async def streams_on(
    cluster: Cluster,
    stub: Any,
    a: Process,
    b: Process,
    prompts: list[str],
    max_new: int,
    timeout_s: float,
    chunks: int,
) -> list[tuple[Stream, asyncio.Task[Stream], Any]]:
    """Streams that all run on worker A (B's intake paused while they are taken), each `chunks` chunks in."""
    async with cluster.intake_paused(b):
        calls = [open_stream(stub, generate_request(p, max_new), timeout_s=timeout_s) for p in prompts]
        await cluster.wait_heartbeat(a, lambda beat: beat["running"] == len(prompts), timeout_s=30)
    streams = [s for s, _, _ in calls]
    await wait_for(lambda: all(len(s.chunks) >= chunks for s in streams), what=f"{chunks} chunks on every stream")
    return calls


def first_arrival_after(stream: Stream, seq: int) -> float:
    arrival = stream.arrival_of_first(lambda event: event.seq > seq)
    assert arrival is not None, f"no event after seq {seq}"
    return arrival


async def test_kill_9_worker_mid_generation_streams_continue_on_the_other(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    """Case 1: 20 streams on worker A, worker B alive; kill -9 A: every stream completes on B, exactly once."""
    n_streams, max_new = 20, 120
    prompts = PROMPTS[:n_streams]
    a, b = cluster.start_worker("worker-a"), cluster.start_worker("worker-b")
    gateway = cluster.start_gateway("gateway")
    await cluster.ready(a, b, gateway)
    stub = cluster.stub(gateway)

    calls = await streams_on(cluster, stub, a, b, prompts, max_new, timeout_s=120, chunks=10)
    streams = [s for s, _, _ in calls]
    await cluster.wait_heartbeat(b)

    killed_at = time.monotonic()
    a.kill()
    await asyncio.gather(*(task for _, task, _ in calls))
    done_at = max(s.ended for s in streams)

    # B logs, for each job it takes over, the last seq the dead worker had logged: B's events come after it.
    resumed = {e["request_id"]: e["seq"] for e in b.events("job_resumed")}
    assert set(resumed) == {s.request_id for s in streams}, "B did not take over every stream"
    first_resumed = min(first_arrival_after(s, resumed[s.request_id]) for s in streams)
    for i, (stream, want) in enumerate(zip(streams, reference.tokens(prompts, max_new), strict=True)):
        assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
        assert_exactly_once(stream.events, want, f"stream {i}")
    events_before_takeover = sum(resumed.values())
    b.send(signal.SIGTERM)
    await b.wait_event("worker_stopped", 15)
    assert b.counts()["reclaimed"] == n_streams

    figure("kill_to_first_resumed_token", first_resumed - killed_at, "s")
    figure("kill_to_all_streams_done", done_at - killed_at, "s")
    figure("events_logged_before_takeover", events_before_takeover)


async def test_sigstop_past_the_lease_then_sigcont_no_duplicate_and_fenced_writes_counted(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    """Case 2: pause worker A (SIGSTOP) for 3 leases while it runs streams, B takes them over; SIGCONT A: its
    stale writes are fenced, no client sees a duplicate."""
    n_streams, max_new = 6, 300
    prompts = PROMPTS[:n_streams]
    a, b = cluster.start_worker("worker-a"), cluster.start_worker("worker-b")
    gateway = cluster.start_gateway("gateway")
    await cluster.ready(a, b, gateway)
    stub = cluster.stub(gateway)

    calls = await streams_on(cluster, stub, a, b, prompts, max_new, timeout_s=120, chunks=10)
    streams = [s for s, _, _ in calls]

    paused_at = time.monotonic()
    a.send(signal.SIGSTOP)
    await b.wait_event("job_resumed", timeout_s=10)
    taken_over_at = time.monotonic()
    await asyncio.sleep(max(0.0, paused_at + 3.0 - time.monotonic()))  # 3 leases
    a.send(signal.SIGCONT)
    woke_at = time.monotonic()
    await asyncio.gather(*(task for _, task, _ in calls))

    for i, (stream, want) in enumerate(zip(streams, reference.tokens(prompts, max_new), strict=True)):
        assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
        assert_exactly_once(stream.events, want, f"stream {i}")
    for worker in (a, b):
        worker.send(signal.SIGTERM)
    await asyncio.gather(a.wait_event("worker_stopped", 15), b.wait_event("worker_stopped", 15))
    counts_a, counts_b = a.counts(), b.counts()
    fenced, lost = counts_a.get("fenced_writes", 0), counts_a.get("lease_lost", 0)
    assert counts_b.get("reclaimed", 0) == n_streams
    assert fenced + lost >= 1, f"the woken worker noticed nothing: {counts_a}"
    assert counts_a.get("STOP_REASON_LENGTH", 0) == 0, f"the woken worker finished a stream it lost: {counts_a}"

    figure("pause_to_takeover", taken_over_at - paused_at, "s")
    figure("woken_worker_fenced_writes", fenced)
    figure("woken_worker_lease_lost", lost)
    figure("streams_done_after_wake", max(s.ended for s in streams) - woke_at, "s")


async def test_sigterm_worker_finishes_in_flight_streams_and_takes_nothing_new(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    """Case 3: SIGTERM worker A with streams in flight: they all complete within its grace period; a request
    sent after the signal is served by worker B."""
    n_streams, max_new, grace_s = 6, 200, 10.0
    prompts = PROMPTS[:n_streams]
    late_prompt = PROMPTS[n_streams]
    a = cluster.start_worker("worker-a", shutdown_grace_s=grace_s)
    b = cluster.start_worker("worker-b")
    gateway = cluster.start_gateway("gateway")
    await cluster.ready(a, b, gateway)
    stub = cluster.stub(gateway)

    calls = await streams_on(cluster, stub, a, b, prompts, max_new, timeout_s=60, chunks=5)
    streams = [s for s, _, _ in calls]

    signalled_at = time.monotonic()
    a.send(signal.SIGTERM)
    await a.wait_event("worker_draining", timeout_s=5)
    late, late_task, _ = open_stream(stub, generate_request(late_prompt, 40), timeout_s=60)
    await asyncio.gather(*(task for _, task, _ in calls), late_task)
    streams_done = max(s.ended for s in streams)
    await a.wait_event("worker_stopped", grace_s + 5)
    stopped_at = time.monotonic()

    for i, (stream, want) in enumerate(zip(streams, reference.tokens(prompts, max_new), strict=True)):
        assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
        assert_exactly_once(stream.events, want, f"stream {i}")
    assert late.code == grpc.StatusCode.OK, (late.code, late.details)
    assert_exactly_once(late.events, reference.tokens([late_prompt], 40)[0], "late stream")
    assert streams_done - signalled_at < grace_s
    counts = a.counts()
    assert counts.get("taken") == n_streams, f"worker A took jobs after SIGTERM: {counts}"
    assert counts.get("STOP_REASON_LENGTH") == n_streams and not counts.get("handed_back"), counts
    b.send(signal.SIGTERM)
    await b.wait_event("worker_stopped", 15)
    assert b.counts().get("taken") == 1

    figure("sigterm_to_streams_done", streams_done - signalled_at, "s")
    figure("sigterm_to_worker_stopped", stopped_at - signalled_at, "s")
    figure("late_request_latency", late.duration, "s")


async def test_drained_past_its_grace_a_job_redis_lost_goes_to_the_other_worker(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    """Redis restarts without persistence while worker A runs a long job: the job's entry is gone and A goes on
    with it unleased. A is then drained and its grace runs out before the job ends: with nothing to hand back,
    it enqueues the job anew and worker B finishes it, every token once. (Before, the stream went silent until
    its deadline: RELIABILITY.md's gap "after a Redis restart without persistence, with several workers".)"""
    prompt, max_new = PROMPTS[0], 1800
    a = cluster.start_worker("worker-a", shutdown_grace_s=0.5, heartbeat_s=0.3)
    b = cluster.start_worker("worker-b", heartbeat_s=0.3)
    gateway = cluster.start_gateway("gateway", outage_bound_s=5)
    await cluster.ready(a, b, gateway)
    stub = cluster.stub(gateway)
    ((stream, task, _),) = await streams_on(cluster, stub, a, b, [prompt], max_new, timeout_s=45, chunks=3)

    await cluster.admin.aclose()
    cluster._admin = None  # the next use connects to the restarted server
    cluster.redis_server.stop()
    await asyncio.sleep(0.3)
    cluster.redis_server.start()
    await a.wait_event("lease_orphaned", timeout_s=10)
    drained_at = time.monotonic()
    a.send(signal.SIGTERM)
    await a.wait_event("worker_stopped", timeout_s=15)
    await task

    assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
    assert_exactly_once(stream.events, reference.tokens_of(prompt, max_new), "stream")
    assert a.counts().get("requeued") == 1, a.counts()
    b.send(signal.SIGTERM)
    await b.wait_event("worker_stopped", 15)
    assert b.counts().get("taken") == 1, b.counts()
    figure("drain_to_stream_done", stream.ended - drained_at, "s")
