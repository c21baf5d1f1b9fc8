"""Overload with real processes (case 8): bursts of 5x what the deployment admits at once. The excess is shed at
once with RESOURCE_EXHAUSTED and a retry hint, the admitted requests complete exactly once in about the time an
unloaded deployment takes for the same work, and the gateway's memory stays flat from burst to burst.

Capacity here: one worker with `max_num_seqs=4` (4 running, 4 more held waiting in its engine) and the
gateway's bounded queue `max_inflight_requests=8` (requests queued or running across all gateways, admitted
and enqueued in one Lua script: gateway/admission.py). Each burst is 40 requests at once."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import Callable

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
)

CAPACITY = 8  # max_inflight_requests; also what the worker holds (2 * max_num_seqs)
BURST = 5 * CAPACITY
BURSTS = 3
MAX_NEW = 40


class PeakRss:
    """Samples a process's resident memory every 20 ms while it runs (the peak between two samples is missed,
    but a growing buffer would show)."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.peak = process.rss_mib()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self.process.rss_mib())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.rss_mib())
            await asyncio.sleep(0.02)


def first_token_latency(stream: Stream) -> float:
    arrival = stream.arrival_of_first(lambda event: event.HasField("tokens"))
    assert arrival is not None, "no token"
    return arrival - stream.started


async def test_overload_at_5x_capacity_sheds_the_excess_and_admitted_requests_keep_their_latency(
    cluster: Cluster, reference: Reference, figure: Callable[..., None]
) -> None:
    worker = cluster.start_worker("worker", max_num_seqs=CAPACITY // 2)
    gateway = cluster.start_gateway("gateway", max_inflight_requests=CAPACITY)
    await cluster.ready(worker, gateway)
    stub = cluster.stub(gateway)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(BURST)]
    expected = dict(zip(PROMPTS, reference.tokens(PROMPTS, MAX_NEW), strict=True))

    # Unloaded: the same work as one admitted burst (two engine batches of 4), one after the other.
    baseline: list[Stream] = []
    for batch in (PROMPTS[:4], PROMPTS[4:8]):
        calls = [open_stream(stub, generate_request(p, MAX_NEW), timeout_s=30) for p in batch]
        baseline += await asyncio.gather(*(task for _, task, _ in calls))
    assert all(s.code == grpc.StatusCode.OK for s in baseline), [(s.code, s.details) for s in baseline]
    unloaded = max(s.duration for s in baseline[:4]) + max(s.duration for s in baseline[4:])
    rss_start = gateway.rss_mib()

    admitted: list[Stream] = []
    shed: list[Stream] = []
    rss_after: list[float] = []
    async with PeakRss(gateway) as rss:
        for _ in range(BURSTS):
            calls = [open_stream(stub, generate_request(p, MAX_NEW), timeout_s=30) for p in prompts]
            streams = await asyncio.gather(*(task for _, task, _ in calls))
            others = [
                (s.code, s.details)
                for s in streams
                if s.code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
            ]
            assert not others, f"neither served nor shed: {others}"
            for prompt, stream in zip(prompts, streams, strict=True):
                if stream.code == grpc.StatusCode.OK:
                    assert_exactly_once(stream.events, expected[prompt], "admitted request")
                    admitted.append(stream)
                else:
                    shed.append(stream)
            this_burst = sum(s.code == grpc.StatusCode.OK for s in streams)
            # All of the capacity is used; requests finishing while the burst is still being admitted may let a
            # few more in, but most of the excess is shed.
            assert CAPACITY <= this_burst <= 2 * CAPACITY, f"{this_burst} of {BURST} admitted"
            rss_after.append(gateway.rss_mib())

    # Shed: at once, before anything was queued, with a retry hint.
    for stream in shed:
        assert not stream.events, "a shed request got events"
        assert int(stream.trailers.get("retry-after-ms", "0")) > 0, stream.trailers
        assert "retry after" in stream.details, stream.details
    shed_latency = sorted(s.duration for s in shed)
    assert shed_latency[-1] < 1.0, f"a shed request waited {shed_latency[-1]:.2f} s for its RESOURCE_EXHAUSTED"
    # Admitted: at most a queue of CAPACITY ahead of them, as when unloaded (+ the load of shedding the rest).
    latency = sorted(s.duration for s in admitted)
    bound = 2.0 * unloaded + 1.0
    assert latency[-1] <= bound, f"an admitted request took {latency[-1]:.2f} s (unloaded: {unloaded:.2f} s)"
    # Nothing left admitted once the streams ended: every admission released (the gateway releases it just
    # after a stream's end, in a task of its own, so the last ones may take a moment).
    for _ in range(100):
        if not (inflight := await cluster.admin.zcard(cluster.keys.inflight)):
            break
        await asyncio.sleep(0.02)
    assert inflight == 0, f"{inflight} admissions not released 2 s after their streams ended"
    # Memory: shedding buffers nothing; three bursts leave the gateway where the first left it.
    growth = rss.peak - rss_start
    drift = rss_after[-1] - rss_after[0]
    assert growth < 64, f"gateway RSS grew {growth:.1f} MiB under overload"
    assert drift < 16, f"gateway RSS drifted {drift:.1f} MiB from the first burst to the last: {rss_after}"

    figure("offered_per_burst", f"{BURST} requests ({BURST // CAPACITY}x the {CAPACITY} admitted at once)")
    figure("admitted", len(admitted))
    figure("shed_resource_exhausted", len(shed))
    figure("shed_latency_median", statistics.median(shed_latency) * 1000, "ms")
    figure("shed_latency_max", shed_latency[-1] * 1000, "ms")
    figure("retry_after_hint", int(shed[0].trailers["retry-after-ms"]), "ms")
    figure("unloaded_latency_same_work", unloaded, "s")
    figure("admitted_latency_median", statistics.median(latency), "s")
    figure("admitted_latency_max", latency[-1], "s")
    figure("admitted_first_token_max", max(first_token_latency(s) for s in admitted), "s")
    figure("gateway_rss_start", rss_start, "MiB")
    figure("gateway_rss_peak_growth", growth, "MiB")
    figure("gateway_rss_drift_first_to_last_burst", drift, "MiB")
    figure("admissions_left_after", 0)
