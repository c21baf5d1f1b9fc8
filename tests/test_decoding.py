"""Request bytes that do not decode: INVALID_ARGUMENT naming the message type (gateway/decoding.py), after
authentication, counted by the metrics, for unary and streaming responses alike.

In process, without a worker (nothing here reaches one); tests/faults/test_inputs.py does the same against
a gateway process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import api
from tests.conftest import running_stack

KEY = "kd-3b1f0c9e8d7a6b5c"
UNDECODABLE = b"\x0a\x03\xff\xfe\xfd"  # field 1 (a string in each request below), not UTF-8
# method, request type, response type, whether the response streams
METHODS = [
    ("GenerateStream", "GenerateRequest", api.GenerateEvent, True),
    ("Generate", "GenerateRequest", api.GenerateResponse, False),
    ("Tokenize", "TokenizeRequest", api.TokenizeResponse, False),
    ("Resume", "ResumeRequest", api.GenerateEvent, True),
]


async def raw_call(channel: grpc.aio.Channel, method: str, response: type, streaming: bool, raw: bytes, **kw) -> None:
    path = f"/codestream.v1.CodeStream/{method}"
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(path, request_serializer=lambda b: b, response_deserializer=response.FromString)(raw, timeout=10, **kw)
    if streaming:
        async for _ in call:
            pass
    else:
        await call


async def status_of(*args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_call(*args, **kw)
    return info.value.code(), info.value.details() or ""


async def test_undecodable_requests_get_invalid_argument_after_auth(
    redis_url: str, demo_model_dir: Path, tmp_path: Path
):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"delta:{KEY}\n")
    gateway = {"api_keys_file": str(keys_file)}
    async with running_stack(redis_url, demo_model_dir, gateway=gateway, start_worker=False) as stack:
        metadata = (("authorization", f"Bearer {KEY}"),)
        for method, request_type, response, streaming in METHODS:
            # Authentication comes first: a caller without a key learns nothing about its bytes.
            refused = await status_of(stack.channel, method, response, streaming, UNDECODABLE)
            assert refused == (grpc.StatusCode.UNAUTHENTICATED, "missing API key"), method
            got = await status_of(stack.channel, method, response, streaming, UNDECODABLE, metadata=metadata)
            expected = f"request: not a valid codestream.v1.{request_type} message"
            assert got == (grpc.StatusCode.INVALID_ARGUMENT, expected), method
            # grpc.aio's abort sends the status before the handler unwinds, so the count lands just after the
            # client has its answer.
            registry = stack.gateway.generations.metrics.registry
            labels = {"method": method, "code": "INVALID_ARGUMENT"}
            for _ in range(200):
                if registry.get_sample_value("codestream_gateway_requests_total", labels) is not None:
                    break
                await asyncio.sleep(0.01)
            assert registry.get_sample_value("codestream_gateway_requests_total", labels) == 1, method

        # Requests that do decode are served as before, through the same interceptors.
        tokens = await stack.stub.Tokenize(api.TokenizeRequest(text="def f():"), metadata=metadata)
        assert len(tokens.token_ids) > 0
        info = await stack.stub.GetModelInfo(api.GetModelInfoRequest(), metadata=metadata)
        assert info.max_model_len > 0
        health = health_pb2_grpc.HealthStub(stack.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="codestream.v1.CodeStream"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
