"""Redis restart with real processes (case 5): the Redis server is stopped mid-load and started again on the
same port ~1 s later, without persistence: the jobs stream, its consumer group, the event logs are all gone.

One scenario runs per module (a restart under load costs a whole stack); each test below checks one part of
what it must guarantee: every stream caught in the outage ends with its completion or with UNAVAILABLE, and
none goes silent for longer than the gateway's outage bound; requests made after the restart are served.

Load: one worker with `max_num_seqs=4` (it holds 8 jobs: 4 running, 4 waiting in its engine) and 12 streams,
so that the outage catches jobs in all three states: running, taken but waiting, still in the jobs stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from codestream.redis_server import EmbeddedRedis, free_port
from tests.faults.conftest import (
    PROMPTS,
    Cluster,
    Reference,
    Stream,
    assert_exactly_once,
    generate_request,
    open_stream,
    wait_for,
)

OUTAGE_BOUND_S = 3.0  # the gateway's CODESTREAM_OUTAGE_BOUND_S
SLACK_S = 1.5  # for the 2-core sandbox: a reconnect delay (0.5 s) and scheduling
DOWN_S = 1.0
CLIENT_DEADLINE_S = 10.0  # the safety net: a stream that ends only at its client deadline has hung
MAX_NEW = 150
N_STREAMS = 12


@dataclass
class Outage:
    streams: list[Stream]  # under way when Redis went down, in PROMPTS order
    chunks_before: list[int]  # chunks each had received by then (0: its job had not started)
    taken: int  # jobs the worker had taken (running or waiting in its engine)
    stopped_at: float
    restarted_at: float
    after: list[Stream] = field(default_factory=list)  # sent once Redis was back
    worker_log: list[dict] = field(default_factory=list)
    tails: str = ""

    def describe(self) -> str:
        lines = [
            f"worker had taken {self.taken} jobs; Redis stopped, then back {self.restarted_at - self.stopped_at:.2f} s"
        ]
        for i, s in enumerate(self.streams):
            lines.append(
                f"  stream {i} {s.request_id[:8]}: {self.chunks_before[i]} chunks before, {len(s.chunks)} at the end, "
                f"{s.code.name if s.code else None} {s.details!r} after {s.ended - self.stopped_at:.2f} s, "
                f"longest silence after the restart {silence_after(s, self.restarted_at):.2f} s"
            )
        for s in self.after:
            lines.append(f"  after the restart: {s.code.name if s.code else None} {s.details!r} in {s.duration:.2f} s")
        return "\n".join(lines) + "\n" + self.tails


def silence_after(stream: Stream, since: float) -> float:
    """The longest the stream went without an event (or its end) from `since` on."""
    marks = [since, *[t for t in stream.arrivals if t > since], stream.ended]
    return max(b - a for a, b in itertools.pairwise(marks))


async def run_outage(cluster: Cluster) -> Outage:
    worker = cluster.start_worker("worker", max_num_seqs=4)
    gateway = cluster.start_gateway("gateway", outage_bound_s=OUTAGE_BOUND_S)
    await cluster.ready(worker, gateway)
    stub = cluster.stub(gateway)
    calls = [open_stream(stub, generate_request(p, MAX_NEW), timeout_s=CLIENT_DEADLINE_S) for p in PROMPTS[:N_STREAMS]]
    streams = [s for s, _, _ in calls]
    await wait_for(lambda: sum(len(s.chunks) >= 5 for s in streams) >= 4, what="4 streams under way")
    taken = (await cluster.admin.xpending(cluster.keys.jobs, cluster.keys.worker_group))["pending"]
    await cluster.admin.aclose()
    cluster._admin = None  # the next use connects to the restarted server

    stopped_at = time.monotonic()
    chunks_before = [len(s.chunks) for s in streams]
    cluster.redis_server.stop()
    await asyncio.sleep(DOWN_S)
    cluster.redis_server.start()
    restarted_at = time.monotonic()

    await asyncio.gather(*(task for _, task, _ in calls))
    # Once the streams caught in the outage have ended (and the gateway has seen the restart), the service
    # serves new requests again.
    await gateway.wait_event("redis_restarted", timeout_s=10)
    after_calls = [open_stream(stub, generate_request(p, 20), timeout_s=15) for p in PROMPTS[N_STREAMS : N_STREAMS + 2]]
    await asyncio.gather(*(task for _, task, _ in after_calls))
    tails = "\n".join(f"----- {p.name} -----\n{p.tail(60)}" for p in cluster.processes)
    return Outage(
        streams, chunks_before, taken, stopped_at, restarted_at, [s for s, _, _ in after_calls], worker.events(), tails
    )


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Outage]:
    """The scenario, once for the module (in an event loop of its own: module-scoped, like its processes)."""
    server = EmbeddedRedis(port=free_port())
    server.start()

    async def scenario() -> Outage:
        cluster = Cluster(tmp_path_factory.mktemp("redis-restart"), demo_model_dir, server)
        try:
            return await run_outage(cluster)
        finally:
            await cluster.close()

    try:
        yield asyncio.run(scenario())
    finally:
        server.close()


def test_redis_restart_every_stream_completes_or_is_unavailable_within_the_bound(
    outage: Outage, reference: Reference, figure: Callable[..., None]
) -> None:
    print(outage.describe())
    figure("redis_stop_to_last_stream_end", max(s.ended for s in outage.streams) - outage.stopped_at, "s")
    figure("longest_silence_after_restart", max(silence_after(s, outage.restarted_at) for s in outage.streams), "s")
    figure("completed", sum(s.code == grpc.StatusCode.OK for s in outage.streams))
    figure("unavailable", sum(s.code == grpc.StatusCode.UNAVAILABLE for s in outage.streams))
    worker_events = [e.get("event") for e in outage.worker_log]
    figure("worker_jobs_orphaned", worker_events.count("lease_orphaned"))
    figure("worker_duplicates_adopted", worker_events.count("duplicate_adopted"))
    # The only worker cannot lose a lease to another: jobs whose entries Redis lost go on, unleased.
    assert worker_events.count("lease_lost") == 0, "the worker dropped jobs Redis had lost"
    expected = reference.tokens(PROMPTS[:N_STREAMS], MAX_NEW)
    for i, (stream, want) in enumerate(zip(outage.streams, expected, strict=True)):
        assert stream.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (i, stream.code, stream.details)
        silence = silence_after(stream, outage.restarted_at)
        assert silence <= OUTAGE_BOUND_S + SLACK_S, f"stream {i} went silent for {silence:.2f} s"
        if stream.code == grpc.StatusCode.OK:
            assert_exactly_once(stream.events, want, f"stream {i}")


def test_redis_restart_new_requests_are_served_afterwards(
    outage: Outage, reference: Reference, figure: Callable[..., None]
) -> None:
    print(outage.describe())
    figure("jobs_group_recreated", len([e for e in outage.worker_log if e.get("event") == "jobs_group_recreated"]))
    figure("new_request_latency_after_restart", max(s.duration for s in outage.after), "s")
    expected = reference.tokens(PROMPTS[N_STREAMS : N_STREAMS + 2], 20)
    for stream, want in zip(outage.after, expected, strict=True):
        assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
        assert_exactly_once(stream.events, want, "request after the restart")
