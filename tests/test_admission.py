"""Admission: bounded in-flight work across gateways (requests, tokens), per-tenant concurrency and token
rate, RESOURCE_EXHAUSTED with a retry hint; a slow reader delays nobody else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc
import pytest

from codestream.client import seqs
from protos import api, api_grpc
from tests.conftest import running_stack, start_test_gateway
from tests.streams import check_stream_shape, collect


def req(prompt: str = "x = 1", n: int = 4, request_id: str = "") -> api.GenerateRequest:
    return api.GenerateRequest(
        prompt=prompt, request_id=request_id, stopping=api.StoppingCriteria(max_new_tokens=n, ignore_eos=True)
    )


async def first_event(stub, request, **kwargs):
    call = stub.GenerateStream(request, **kwargs)
    return call, await call.read()


async def rejected(stub, request, **kwargs) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request, **kwargs)
    return info.value


def retry_after_ms(error: grpc.aio.AioRpcError) -> int:
    return int(dict(error.trailing_metadata() or ())["retry-after-ms"])


async def test_in_flight_requests_are_bounded_across_gateways(redis_url: str, demo_model_dir: Path):
    gateway = {"max_inflight_requests": 3}
    async with running_stack(redis_url, demo_model_dir, start_worker=False, gateway=gateway) as stack:
        other = await start_test_gateway(redis_url, demo_model_dir, stack.namespace, max_inflight_requests=3)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
        try:
            stub_b = api_grpc.CodeStreamStub(channel)
            # Three queued (no worker), through two gateways; the fourth is refused, by either gateway.
            calls = [(await first_event(s, req()))[0] for s in (stack.stub, stub_b, stack.stub)]
            for stub in (stack.stub, stub_b):
                error = await rejected(stub, req())
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "in flight" in error.details() and retry_after_ms(error) > 0
            calls[0].cancel()  # one leaves: its slot is free again
            await asyncio.sleep(0.3)
            call, event = await first_event(stack.stub, req())
            assert event.HasField("queued")
            for c in [*calls, call]:
                c.cancel()
        finally:
            await channel.close()
            await other.stop(grace_s=0)


async def test_in_flight_tokens_are_bounded(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir, start_worker=False, gateway={"max_inflight_tokens": 300}) as s:
        call, _ = await first_event(s.stub, req(n=200))
        error = await rejected(s.stub, req(n=200))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens in flight" in error.details()
        small = await first_event(s.stub, req(n=50))
        for c in (call, small[0]):
            c.cancel()


async def test_per_tenant_concurrency_and_token_rate(redis_url: str, demo_model_dir: Path, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("alpha:key-alpha\nbeta:key-beta\n")
    alpha, beta = (("authorization", "Bearer key-alpha"),), (("authorization", "Bearer key-beta"),)
    gateway = {"api_keys_file": str(keys), "tenant_max_concurrency": 1}
    async with running_stack(redis_url, demo_model_dir, start_worker=False, gateway=gateway) as stack:
        call, _ = await first_event(stack.stub, req(), metadata=alpha)
        error = await rejected(stack.stub, req(), metadata=alpha)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "API key" in error.details()
        other, _ = await first_event(stack.stub, req(), metadata=beta)  # beta is not affected by alpha
        for c in (call, other):
            c.cancel()

    # A slow refill (10 tokens/s), so that the first request's own run time cannot refill the bucket.
    gateway = {"api_keys_file": str(keys), "tenant_tokens_per_s": 10.0, "tenant_token_burst": 60}
    async with running_stack(redis_url, demo_model_dir, gateway=gateway) as stack:
        await stack.stub.Generate(req(n=40), metadata=alpha)  # ~45 of 60 tokens of burst
        error = await rejected(stack.stub, req(n=40), metadata=alpha)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in error.details()
        wait_ms = retry_after_ms(error)
        assert 0 < wait_ms <= 4000
        await stack.stub.Generate(req(n=40), metadata=beta)  # beta has its own bucket
        await asyncio.sleep(wait_ms / 1000 + 0.05)
        await stack.stub.Generate(req(n=40), metadata=alpha)  # refilled as the hint said
        too_big = await rejected(stack.stub, req(n=100), metadata=alpha)
        assert "burst" in too_big.details()


async def test_a_dead_gateways_admissions_expire_with_their_deadlines(redis_url: str, demo_model_dir: Path):
    gateway = {"max_inflight_requests": 1}
    async with running_stack(redis_url, demo_model_dir, start_worker=False, gateway=gateway) as stack:
        ns = stack.namespace
        doomed = await start_test_gateway(redis_url, demo_model_dir, ns, max_inflight_requests=1)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{doomed.port}")
        stub = api_grpc.CodeStreamStub(channel)
        await first_event(stub, req(), timeout=1.5)
        # The gateway dies without releasing anything: its admission lives until the request's deadline.
        doomed.generations.admission.release = _never  # (a dead gateway releases nothing)
        await doomed.stop(grace_s=0)
        await channel.close()
        error = await rejected(stack.stub, req())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(1.6)
        call, event = await first_event(stack.stub, req())
        assert event.HasField("queued")
        call.cancel()


async def test_releases_sweep_the_admissions_a_dead_gateway_left(redis_url: str, demo_model_dir: Path):
    """Below the limits, nothing refuses and so nothing sweeps at admission: the next release does, so that
    a dead gateway's entries (requests and tokens) do not pile up in Redis."""
    gateway = {"max_inflight_requests": 10, "max_inflight_tokens": 10_000}
    async with running_stack(redis_url, demo_model_dir, gateway=gateway) as stack:
        ns, redis = stack.namespace, stack.gateway.generations.redis
        keys = stack.gateway.generations.keys
        doomed = await start_test_gateway(redis_url, demo_model_dir, ns, **gateway, request_timeout_s=1.0)
        doomed.generations.admission.release = _never
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{doomed.port}")
        await first_event(api_grpc.CodeStreamStub(channel), req(n=8))
        await doomed.stop(grace_s=0)
        await channel.close()
        assert await redis.zcard(keys.inflight) == 1
        assert int(await redis.hget(keys.inflight_tokens, "_total")) > 0
        await asyncio.sleep(1.2)  # past its deadline
        _ids, _text, finished = check_stream_shape(await collect(stack.stub, req(n=2)))
        assert finished.generated_tokens == 2
        await asyncio.sleep(0.3)  # (the release runs after the stream ends)
        assert await redis.zcard(keys.inflight) == 0
        assert int(await redis.hget(keys.inflight_tokens, "_total") or 0) == 0


async def _never(*_args) -> None:
    return None


async def test_a_slow_reader_delays_no_one_else(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        slow = stack.stub.GenerateStream(req("def slow():", 300))
        await slow.read()  # then it stops reading while its tokens keep coming
        start = time.monotonic()
        others = await asyncio.gather(*(stack.stub.Generate(req(f"x = {i}", 30)) for i in range(4)))
        assert all(o.finished.generated_tokens == 30 for o in others)
        assert time.monotonic() - start < 20
        events = []
        while (event := await slow.read()) is not grpc.aio.EOF:
            events.append(event)
        assert seqs(events) == list(range(1, seqs(events)[-1] + 1))
        assert events[-1].finished.generated_tokens == 300
        with contextlib.suppress(Exception):
            slow.cancel()
