"""Request bytes that are not a valid message get INVALID_ARGUMENT, not UNKNOWN.

grpcio runs a handler's request deserializer before the handler, and turns whatever it raises into
UNKNOWN "Unexpected DecodeError", out of the servicer's reach. So this interceptor takes the deserializer
off each handler with a unary request (the request reaches the wrapper as raw bytes) and parses inside the
handler's own execution, where a DecodeError can be answered like any other bad input.

It is the innermost interceptor: authentication replaces the whole handler of a refused call, so an
unauthenticated caller's bytes are still never parsed, and the metrics interceptor counts the status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from gateway.handlers import PerMethod, wrap_handler

log = structlog.get_logger("gateway.decoding")


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Parses unary requests inside the handler; undecodable bytes -> INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self._wrapped = PerMethod(_parsing)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        # Streamed requests (reflection) are deserialized message by message by grpcio: left as they are.
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return self._wrapped.get(handler, handler_call_details.method)


def _parsing(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse: Callable[[bytes], Any] = handler.request_deserializer
    message = f"request: not a valid {_message_name(parse)} message"

    async def decoded(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            log.info("request_undecodable", method=method, size=len(raw))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    # (every handler here is async)
    return wrap_handler(handler, before=decoded, request_deserializer=None) or handler


def _message_name(parse: Callable[[bytes], Any]) -> str:
    """`codestream.v1.GenerateRequest` for the generated `GenerateRequest.FromString`."""
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")
