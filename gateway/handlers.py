"""Helpers for interceptors that wrap a service's handlers (authentication, metrics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def rebuild_handler(
    handler: grpc.RpcMethodHandler, behavior: Callable, request_deserializer: Any
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary/stream request and response) running `behavior`."""
    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(behavior, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)


def handler_behavior(handler: grpc.RpcMethodHandler) -> Callable:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary
