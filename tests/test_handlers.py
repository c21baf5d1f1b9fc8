"""gateway/handlers.py: interceptor wrappers keep the handler's kind and function type, run their work in
order, and are built once per method (not once per call)."""

from __future__ import annotations

import contextlib
import inspect

import grpc

from gateway.handlers import PerMethod, wrap_handler


async def numbers(request, context):
    for i in range(request):
        yield i


async def double(request, context):
    return 2 * request


def plain(request, context):
    return request


async def test_wrappers_keep_the_function_type_and_run_before_and_around_in_order():
    trail = []

    @contextlib.contextmanager
    def around(context):
        trail.append("enter")
        yield
        trail.append("exit")

    async def before(request, context):
        trail.append(f"before {request}")
        return request + 1

    stream = wrap_handler(grpc.unary_stream_rpc_method_handler(numbers), before=before, around=around)
    assert stream.response_streaming and inspect.isasyncgenfunction(stream.unary_stream)
    assert [i async for i in stream.unary_stream(2, None)] == [0, 1, 2]
    call = wrap_handler(grpc.unary_unary_rpc_method_handler(double), before=before, around=around)
    assert inspect.iscoroutinefunction(call.unary_unary)
    assert await call.unary_unary(4, None) == 10
    assert trail == ["enter", "before 2", "exit", "enter", "before 4", "exit"]
    # A plain function cannot be wrapped this way: the caller is told (None), never handed a broken handler.
    assert wrap_handler(grpc.unary_unary_rpc_method_handler(plain), before=before) is None


def test_per_method_builds_a_wrapper_once_per_method_and_again_for_a_new_handler():
    built = []

    def build(handler, method):
        built.append(method)
        return wrap_handler(handler)

    cache = PerMethod(build)
    handler = grpc.unary_unary_rpc_method_handler(double)
    first = cache.get(handler, "/svc/Double")
    assert cache.get(handler, "/svc/Double") is first
    other = grpc.unary_unary_rpc_method_handler(double)
    assert cache.get(other, "/svc/Double") is not first
    cache.get(handler, "/svc/Other")
    assert built == ["/svc/Double", "/svc/Double", "/svc/Other"]
