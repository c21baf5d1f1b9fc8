"""What the gateway's interceptors (metrics, API keys, request decoding) share: a handler wrapped with work
of their own, built once per method.

An interceptor of grpc.aio runs for every call and may return a different handler. Ours return the real
handler wrapped with their work, and the wrapper depends only on the method, so it is built on the
method's first call and reused (a wrapper per call costs closures and a new handler on every request's
way to its first token). Per-call facts (the caller's key, the request bytes) are read inside the
wrapper, from the call's own context.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc

# before(request, context) -> the request the real handler gets (it may also abort the call).
Before = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# around(context) -> a context manager spanning the whole call.
Around = Callable[[grpc.aio.ServicerContext], AbstractContextManager[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    *,
    before: Before | None = None,
    around: Around | None = None,
    request_deserializer: Any = ...,
) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as `handler` that runs `before` and then the real handler, all inside
    `around`. `request_deserializer`: the new handler's (default: the handler's own). None for a plain
    (non-async) handler, which none of the gateway's services have: the caller decides what that means."""
    behavior = _behavior(handler)

    async def request_of(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return request if before is None else await before(request, context)

    def scope(context: grpc.aio.ServicerContext) -> AbstractContextManager[Any]:
        return nullcontext() if around is None else around(context)

    # grpc.aio picks how to drive a handler by its function type (async generator or coroutine function),
    # so the wrapper must be of the same type as what it wraps.
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with scope(context):
                async for response in behavior(await request_of(request, context), context):
                    yield response

        wrapped: Callable = stream
    elif inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with scope(context):
                return await behavior(await request_of(request, context), context)

        wrapped = call
    else:
        return None
    deserializer = handler.request_deserializer if request_deserializer is ... else request_deserializer
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(wrapped, request_deserializer=deserializer, response_serializer=handler.response_serializer)


class PerMethod:
    """Wrapped handlers by method, built by `build(handler, method)` on a method's first call (and again if
    the server's handler for it changes)."""

    def __init__(self, build: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler | None]) -> None:
        self.build = build
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler | None:
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._cache[method] = (handler, self.build(handler, method))
        return cached[1]


def _behavior(handler: grpc.RpcMethodHandler) -> Callable:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary
