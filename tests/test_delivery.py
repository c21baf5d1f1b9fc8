"""Delivery guarantees in process: gap repair from the event log, Redis subscription loss, Resume through
another gateway, reclaim and continuation after a worker dies, fencing, dead letters, poison requests,
drain hand-back. Real Redis, real gRPC, the demo model. (tests/faults/ does the same with real processes.)"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from codestream.client import seqs
from protos import api, api_grpc
from protos.keys import JOB_FIELD, Keys
from tests.conftest import start_test_gateway, start_worker
from worker.emitter import Emission
from worker.engine import EngineConfig, LLMEngine, SamplingParams

PROMPTS = ["def parse(path):\n", "import json\nclass Config:\n", "for i in range(10):\n", "x = [1, 2, 3]\n"]


async def wait_until(condition, timeout_s: float = 30) -> None:
    """Poll worker or engine state, which has no event to wait on."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def request(prompt: str, n: int) -> api.GenerateRequest:
    return api.GenerateRequest(
        prompt=prompt,
        stopping=api.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
        response=api.ResponseOptions(return_token_ids=True),
    )


def expected_tokens(model_dir: Path, prompts: list[str], n: int) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=512))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), engine.tokenizer.encode(p).ids, SamplingParams(max_new_tokens=n, ignore_eos=True))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


def check_complete(events: list[api.GenerateEvent], n: int) -> list[int]:
    assert events[0].HasField("queued") or events[0].seq > 0
    body = [e for e in events if not e.HasField("queued")]
    covered = seqs(body)  # a merged chunk covers several seqs
    assert covered == list(range(covered[0], covered[0] + len(covered))), f"seq not contiguous: {covered}"
    assert body[-1].HasField("finished"), body[-1]
    ids = [t for e in body if e.HasField("tokens") for t in e.tokens.token_ids]
    assert len(ids) == n
    return ids


@contextlib.asynccontextmanager
async def channel_to(gateway):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    try:
        yield api_grpc.CodeStreamStub(channel)
    finally:
        await channel.close()


async def stop_all(*things) -> None:
    for thing in things:
        if hasattr(thing, "stop") and isinstance(thing.stop, asyncio.Event):
            thing.stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(thing.task, 20)
            await thing.worker.redis.aclose()
        else:
            await thing.stop(grace_s=0)


async def test_pubsub_gaps_are_repaired_from_the_event_log(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    worker = start_worker(redis_url, demo_model_dir, ns)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    dispatch = gateway.router._dispatch
    dropped = 0

    def lossy(data: bytes) -> None:  # pub/sub loses every third batch
        nonlocal dropped
        dropped += 1
        if dropped % 3:
            dispatch(data)

    gateway.router._dispatch = lossy
    try:
        async with channel_to(gateway) as stub:
            results = await asyncio.gather(*(collect(stub, request(p, 24)) for p in PROMPTS))
        expected = expected_tokens(demo_model_dir, PROMPTS, 24)
        for events, want in zip(results, expected, strict=True):
            assert check_complete(events, 24) == want
        assert dropped >= 3
    finally:
        await stop_all(gateway, worker)


async def collect(stub, req, **kwargs) -> list[api.GenerateEvent]:
    return [e async for e in stub.GenerateStream(req, **kwargs)]


async def test_streams_survive_a_dropped_subscription(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    worker = start_worker(redis_url, demo_model_dir, ns)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with channel_to(gateway) as stub:
            call = stub.GenerateStream(request(PROMPTS[0], 200))
            events = []
            async for event in call:
                events.append(event)
                if len(events) == 5:
                    # Cut every pub/sub connection: the gateway's subscription drops mid-stream.
                    await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert check_complete(events, 200) == expected_tokens(demo_model_dir, PROMPTS[:1], 200)[0]
    finally:
        await admin.aclose()
        await stop_all(gateway, worker)


async def test_resume_through_another_gateway_gets_the_rest_exactly_once(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    worker = start_worker(redis_url, demo_model_dir, ns)
    gw_a = await start_test_gateway(redis_url, demo_model_dir, ns, disconnect_grace_s=30)
    gw_b = await start_test_gateway(redis_url, demo_model_dir, ns)
    try:
        req = request(PROMPTS[1], 120)
        req.request_id = "resume-me"
        first: list[api.GenerateEvent] = []
        async with channel_to(gw_a) as stub_a:
            async for event in stub_a.GenerateStream(req):
                first.append(event)
                if len(first) == 6:
                    break  # the connection to gateway A is gone
        last_seq = first[-1].seq
        async with channel_to(gw_b) as stub_b:
            rest = [e async for e in stub_b.Resume(api.ResumeRequest(request_id="resume-me", after_seq=last_seq))]
        assert rest[0].seq == last_seq + 1
        ids = check_complete(first + rest, 120)
        assert ids == expected_tokens(demo_model_dir, PROMPTS[1:2], 120)[0]
        async with channel_to(gw_b) as stub_b:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect_resume(stub_b, "never-existed")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stop_all(gw_a, gw_b, worker)


async def collect_resume(stub, request_id: str) -> list[api.GenerateEvent]:
    return [e async for e in stub.Resume(api.ResumeRequest(request_id=request_id))]


async def test_a_dead_workers_jobs_continue_on_another_with_no_duplicate_or_missing_token(
    redis_url: str, demo_model_dir: Path
):
    ns = namespace()
    settings = {"lease_s": 1.0, "heartbeat_s": 0.2}
    doomed = start_worker(redis_url, demo_model_dir, ns, **settings)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    survivor = None
    try:
        async with channel_to(gateway) as stub:
            calls = [asyncio.create_task(collect(stub, request(p, 150))) for p in PROMPTS]
            await wait_until(lambda: doomed.worker.engine.stats().num_running == len(PROMPTS))
            await asyncio.sleep(0.3)  # some tokens out
            doomed.crash()
            survivor = start_worker(redis_url, demo_model_dir, ns, **settings)
            results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        for events, want in zip(results, expected_tokens(demo_model_dir, PROMPTS, 150), strict=True):
            assert check_complete(events, 150) == want
        assert survivor.worker.counts["reclaimed"] == len(PROMPTS)

        # The dead worker wakes up and writes an event for a job it lost: fenced, never seen by a client.
        rid = results[0][0].request_id
        stale = Emission(rid, 1, 999, api.GenerateEvent(request_id=rid, seq=999).SerializeToString(), "x", None)
        assert await doomed.worker.emitter.emit([stale]) == [stale]
    finally:
        await doomed.worker.redis.aclose()
        await stop_all(gateway, *([survivor] if survivor else []))


async def test_a_job_that_keeps_failing_is_dead_lettered_and_its_client_told(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    settings = {"lease_s": 0.5, "heartbeat_s": 0.2, "max_deliveries": 1}
    first = start_worker(redis_url, demo_model_dir, ns, **settings)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    second = None
    try:
        async with channel_to(gateway) as stub:
            call = asyncio.create_task(collect(stub, request(PROMPTS[0], 400)))
            await wait_until(lambda: first.worker.engine.stats().num_running > 0)
            first.crash()
            second = start_worker(redis_url, demo_model_dir, ns, **settings)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call, 30)
        assert info.value.code() == grpc.StatusCode.ABORTED
        keys = Keys(ns)
        dead = await second.worker.redis.xrange(keys.dead_letters)
        assert len(dead) == 1 and JOB_FIELD in dead[0][1]
    finally:
        await first.worker.redis.aclose()
        await stop_all(gateway, *([second] if second else []))


async def test_a_poison_request_fails_alone(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    poison = 777
    worker = start_worker(redis_url, demo_model_dir, ns, fault_poison_token_id=poison)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    try:
        async with channel_to(gateway) as stub:
            healthy = [asyncio.create_task(collect(stub, request(p, 40))) for p in PROMPTS]
            await asyncio.sleep(0.3)  # the healthy ones are decoding when the poison arrives
            bad = api.GenerateRequest(
                prompt_token_ids=api.TokenIds(ids=[1, 5, poison, 9]), stopping=api.StoppingCriteria(max_new_tokens=5)
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, bad)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            results = await asyncio.gather(*healthy)
        for events, want in zip(results, expected_tokens(demo_model_dir, PROMPTS, 40), strict=True):
            assert check_complete(events, 40) == want
        assert worker.worker.counts["poisoned"] == 1
    finally:
        await stop_all(gateway, worker)


async def test_drain_hands_unfinished_jobs_to_another_worker(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    settings = {"lease_s": 1.0, "heartbeat_s": 0.2}
    leaving = start_worker(redis_url, demo_model_dir, ns, grace_s=0.3, **settings)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    staying = start_worker(redis_url, demo_model_dir, ns, grace_s=0.3, **settings)
    try:
        # Whichever worker took the job is stopped with a grace too short to finish it.
        async with channel_to(gateway) as stub:
            call = asyncio.create_task(collect(stub, request(PROMPTS[2], 300)))
            await wait_until(lambda: leaving.worker.requests or staying.worker.requests)
            holder, other = (leaving, staying) if leaving.worker.requests else (staying, leaving)
            holder.stop.set()
            events = await asyncio.wait_for(call, 60)
        assert check_complete(events, 300) == expected_tokens(demo_model_dir, PROMPTS[2:3], 300)[0]
        assert holder.worker.counts["handed_back"] == 1 and other.worker.counts["reclaimed"] == 1
    finally:
        await stop_all(gateway, leaving, staying)


async def test_queued_jobs_are_enqueued_again_after_redis_restarts_empty(demo_model_dir: Path):
    """A Redis restart without persistence loses the jobs stream: jobs no worker had started are enqueued
    again by their gateway, and the worker recreates its consumer group."""
    from codestream.redis_server import EmbeddedRedis

    server = EmbeddedRedis()
    url = server.start()
    ns = namespace()
    gateway = await start_test_gateway(url, demo_model_dir, ns, outage_bound_s=5)
    worker = None
    try:
        async with channel_to(gateway) as stub:
            call = asyncio.create_task(collect(stub, request(PROMPTS[0], 20), timeout=60))
            await wait_until(lambda: gateway.generations.active)
            server.stop()  # queued job gone with the data
            server.requested_port = server.port
            server.start()
            await wait_until(lambda: gateway.router.redis_restarted_at > 0)
            worker = start_worker(url, demo_model_dir, ns)
            events = await asyncio.wait_for(call, 60)
        assert check_complete(events, 20) == expected_tokens(demo_model_dir, PROMPTS[:1], 20)[0]
    finally:
        await stop_all(gateway, *([worker] if worker else []))
        server.close()


async def test_jobs_a_worker_runs_when_redis_restarts_empty_go_on_and_their_second_delivery_is_adopted(
    demo_model_dir: Path,
):
    """Redis restarts without its data while a worker runs one job and holds another waiting: their stream
    entries are gone. The worker goes on with both (they were not lost to another worker), and when the
    gateway enqueues the unstarted one again, its new entry becomes the lease of the job already held."""
    from codestream.redis_server import EmbeddedRedis

    server = EmbeddedRedis()
    url = server.start()
    ns = namespace()
    worker = start_worker(url, demo_model_dir, ns, max_num_seqs=1, heartbeat_s=0.2)
    gateway = await start_test_gateway(url, demo_model_dir, ns, outage_bound_s=5)
    try:
        async with channel_to(gateway) as stub:
            running: list[api.GenerateEvent] = []

            async def collect_running() -> list[api.GenerateEvent]:
                # Long enough to still run when the worker's heartbeats reach the restarted Redis, and when the
                # gateway's second delivery of the other job comes (decode steps launched ahead made 400 tokens
                # too short for that on a fast machine).
                async for event in stub.GenerateStream(request(PROMPTS[0], 1200), timeout=60):
                    running.append(event)
                return running

            calls = [asyncio.create_task(collect_running())]
            await wait_until(lambda: len(running) >= 3)  # the gateway has seen its events: not enqueued again
            calls.append(asyncio.create_task(collect(stub, request(PROMPTS[1], 60), timeout=60)))
            await wait_until(lambda: len(worker.worker.requests) == 2)  # the second one waits in the engine
            server.stop()
            server.requested_port = server.port
            server.start()
            results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        wants = expected_tokens(demo_model_dir, PROMPTS[:2], 1200)
        for events, n, want in zip(results, (1200, 60), wants, strict=True):
            assert check_complete(events, n) == want[:n]
        counts = worker.worker.counts
        assert counts["lease_lost"] == 0 and counts["orphaned"] >= 1 and counts["duplicate_adopted"] == 1, counts
        # The adopted entry was the job's lease: its final event acknowledged and deleted it.
        assert await worker.worker.redis.xlen(Keys(ns).jobs) == 0
    finally:
        await stop_all(gateway, worker)
        server.close()


async def test_samples_continue_on_another_worker(redis_url: str, demo_model_dir: Path):
    ns = namespace()
    settings = {"lease_s": 1.0, "heartbeat_s": 0.2}
    doomed = start_worker(redis_url, demo_model_dir, ns, **settings)
    gateway = await start_test_gateway(redis_url, demo_model_dir, ns)
    survivor = None
    request = api.GenerateRequest(
        prompt=PROMPTS[0],
        sampling=api.SamplingParameters(do_sample=True, temperature=1.0, seed=9, n=2),
        stopping=api.StoppingCriteria(max_new_tokens=120, ignore_eos=True),
        response=api.ResponseOptions(return_token_ids=True),
    )
    try:
        async with channel_to(gateway) as stub:
            reference = [e async for e in stub.GenerateStream(request)]  # uninterrupted
            call = asyncio.create_task(collect(stub, request))
            await wait_until(lambda: doomed.worker.engine.stats().num_running == 2)
            await asyncio.sleep(0.3)
            doomed.crash()
            survivor = start_worker(redis_url, demo_model_dir, ns, **settings)
            events = await asyncio.wait_for(call, 60)

        def tokens(evs, index):
            return [t for e in evs if e.HasField("tokens") and e.index == index for t in e.tokens.token_ids]

        assert seqs(events) == list(range(seqs(events)[-1] + 1))
        for index in (0, 1):
            assert tokens(events, index) == tokens(reference, index), f"sample {index}"
        assert survivor.worker.counts["reclaimed"] == 1
    finally:
        await doomed.worker.redis.aclose()
        await stop_all(gateway, *([survivor] if survivor else []))


async def test_a_worker_stops_even_when_one_of_its_tasks_ignores_cancellation(redis_url: str, demo_model_dir: Path):
    released = asyncio.Event()

    async def stubborn_heartbeat(every_s: float) -> None:
        # Swallows its cancellation, as a library call stuck in its cleanup would, until the test ends.
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    running = start_worker(redis_url, demo_model_dir, namespace(), grace_s=0.3)
    running.worker._heartbeat = stubborn_heartbeat  # (run() has not started its tasks yet)
    await wait_until(lambda: running.worker.tasks)
    try:
        with capture_logs() as logs:
            running.stop.set()
            await asyncio.wait_for(running.task, 30)
        stuck = [e for e in logs if e["event"] == "worker_task_stuck"]
        assert [e["task"] for e in stuck] == ["heartbeat"], logs
        assert any("stubborn_heartbeat" in frame for frame in stuck[0]["stack"])
        assert logs[-1]["event"] == "worker_stopped"
    finally:
        released.set()
