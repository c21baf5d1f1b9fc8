"""A request's life on its way through the whole stack: cancelled, out of time, queued before any worker,
its client id taken and freed, its gateway drained (the whole path, as in test_e2e.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import api
from tests.conftest import running_stack
from tests.streams import check_stream_shape, collect, greedy_request


async def test_cancel_rpc_ends_the_stream_with_cancelled(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        request = greedy_request("def forever():", 1500, ignore_eos=True)
        request.request_id = "client-chosen.id-1"
        call = stack.stub.GenerateStream(request)
        events = []
        async for event in call:
            events.append(event)
            if len(events) == 3:
                # The same id may not be used twice while in flight ...
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stack.stub.Generate(request)
                assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
                # ... and a Cancel from another call stops it.
                await stack.stub.Cancel(api.CancelRequest(request_id="client-chosen.id-1"))
        _ids, _text, finished = check_stream_shape(events)
        assert finished.stop_reason == api.STOP_REASON_CANCELLED
        assert events[0].request_id == "client-chosen.id-1"
        assert stack.worker.engine.stats().num_running == 0


async def test_a_client_id_stays_taken_while_its_request_runs_and_while_its_events_are_kept(
    redis_url: str, demo_model_dir: Path
):
    async with running_stack(redis_url, demo_model_dir) as stack:
        call = stack.stub.GenerateStream(greedy_request("def first():", 1500, "idempotency-key-1", ignore_eos=True))
        while not (await call.read()).HasField("tokens"):
            pass
        # Refused while it runs, and a refusal does not free the id for the next try.
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stack.stub.Generate(greedy_request("def other():", 4, "idempotency-key-1"), timeout=10)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            await asyncio.sleep(0.3)  # (time for whatever the refusal might wrongly free)
        await stack.stub.Cancel(api.CancelRequest(request_id="idempotency-key-1"))
        while (event := await call.read()) is not grpc.aio.EOF:
            last = event
        assert last.finished.stop_reason == api.STOP_REASON_CANCELLED
        await asyncio.sleep(0.3)  # (the gateway's clean-up after a stream runs in tasks of its own)
        # Ended, its events still kept: the id is still taken (a retry does not generate again) ...
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Generate(greedy_request("def other():", 4, "idempotency-key-1"), timeout=10)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "Resume" in info.value.details()
        # ... and Resume reads the first request's events, ending as it ended.
        resumed = [e async for e in stack.stub.Resume(api.ResumeRequest(request_id="idempotency-key-1"))]
        assert resumed[-1].finished.stop_reason == api.STOP_REASON_CANCELLED
        assert not stack.gateway.generations.active


async def test_deadline_with_no_worker_ends_with_deadline_exceeded(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir, start_worker=False, gateway={"deadline_grace_s": 0.2}) as stack:
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.stub, greedy_request("x", 4), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 3


async def test_server_side_timeout_applies_when_the_client_sets_no_deadline(redis_url: str, demo_model_dir: Path):
    gateway = {"deadline_grace_s": 0.2, "request_timeout_s": 0.5}
    async with running_stack(redis_url, demo_model_dir, start_worker=False, gateway=gateway) as stack:
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.stub, greedy_request("x", 4))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.5 < time.monotonic() - start < 3
        assert not stack.gateway.generations.active


async def test_jobs_queued_before_any_worker_are_served_and_expired_ones_skipped(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir, start_worker=False) as stack:
        # One request with a short deadline and one without, both queued while no worker runs.
        short = asyncio.create_task(collect(stack.stub, greedy_request("a", 4), timeout=0.5))
        normal = asyncio.create_task(collect(stack.stub, greedy_request("b", 4, ignore_eos=True)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await short
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stop = asyncio.Event()
        task = asyncio.create_task(stack.worker.run(stop, heartbeat_s=0.5, shutdown_grace_s=2))
        try:
            ids, _text, finished = check_stream_shape(await asyncio.wait_for(normal, timeout=30))
            assert len(ids) == 4 and finished.stop_reason == api.STOP_REASON_LENGTH
            # The expired job was dropped without running.
            assert stack.worker.counts["STOP_REASON_DEADLINE_before_start"] == 1
            assert stack.worker.counts["taken"] == 2
        finally:
            stop.set()
            await task


async def test_a_job_cancelled_while_queued_ends_cancelled_when_a_worker_takes_it(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir, start_worker=False) as stack:
        request = greedy_request("def queued():", 1500, ignore_eos=True)
        request.request_id = "queued-then-cancelled"
        call = stack.stub.GenerateStream(request)
        while not (event := await call.read()).HasField("queued"):
            pass
        # No worker runs: the cancel notice reaches nobody; the job stays queued with its cancel flag set.
        await stack.stub.Cancel(api.CancelRequest(request_id="queued-then-cancelled"))
        stop = asyncio.Event()
        task = asyncio.create_task(stack.worker.run(stop, heartbeat_s=0.5, shutdown_grace_s=2))
        try:
            # The worker starts the job at once and reads the flag meanwhile: it stops after a step or two.
            events = []
            while (event := await call.read()) is not grpc.aio.EOF:
                events.append(event)
            assert events[-1].finished.stop_reason == api.STOP_REASON_CANCELLED, events[-1]
            assert stack.worker.counts["taken"] == 1 and not stack.worker.requests
            counts = stack.worker.counts
            assert counts["STOP_REASON_CANCELLED"] + counts["STOP_REASON_CANCELLED_before_start"] == 1, counts
            assert counts["generated_tokens"] <= 4, counts  # the steps that ran while the flag was read
            assert stack.worker.engine.stats().num_running == 0
        finally:
            stop.set()
            await task


async def test_gateway_drain_finishes_in_flight_streams_and_refuses_new_ones(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        call = stack.stub.GenerateStream(greedy_request("def drain():", 60, ignore_eos=True))
        events = []
        stopping = None
        async for event in call:
            events.append(event)
            if len(events) == 3:
                stopping = asyncio.create_task(stack.gateway.stop(grace_s=30, delay_s=0.5))
                await asyncio.sleep(0.1)
                health = health_pb2_grpc.HealthStub(stack.channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
        ids, _text, finished = check_stream_shape(events)
        assert len(ids) == 60 and finished.stop_reason == api.STOP_REASON_LENGTH
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Generate(greedy_request("x", 2), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
