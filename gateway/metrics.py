"""Gateway metrics (prometheus-client), served on their own HTTP port (`--metrics-port`).

Per-RPC counts by final status come from an interceptor (cross-cutting, the servicer stays thin); the
stream timings are observed where the events pass (generations.py): time to first token and inter-token
latency as the gateway relays them, queue time from the worker's Finished event, end-to-end duration.
Each gateway owns a registry, so that several can run in one process (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from codestream import gc_pauses
from gateway.handlers import PerMethod, wrap_handler

# Latency buckets from 1 ms to 10 min: first tokens and whole generations share them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.gc_pauses = gc_pauses.track(r)
        self.requests = Counter(
            "codestream_gateway_requests", "RPCs by method and final status", ["method", "code"], registry=r
        )
        self.active_streams = Gauge("codestream_gateway_active_streams", "generations in flight", registry=r)
        self.time_to_first_token = Histogram(
            "codestream_gateway_time_to_first_token_seconds", "acceptance to the first token relayed",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "codestream_gateway_inter_token_latency_seconds", "between consecutive token chunks relayed",
            buckets=TOKEN_GAP_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "codestream_gateway_request_duration_seconds", "acceptance to the last event relayed",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "codestream_gateway_queue_time_seconds", "acceptance to a worker starting the request",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "codestream_gateway_rejected", "requests refused by admission, by reason", ["reason"], registry=r
        )
        self.repaired_events = Counter(
            "codestream_gateway_repaired_events", "events recovered from the event log (pub/sub lost them)",
            registry=r,
        )  # fmt: skip

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if port > 0:
            start_http_server(port, addr=host, registry=self.registry)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and the status it ended with."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._wrapped = PerMethod(self._counting)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        return None if handler is None else self._wrapped.get(handler, handler_call_details.method)

    def _counting(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[-1]
        count = self.metrics.requests

        @contextlib.contextmanager
        def recorded(context: grpc.aio.ServicerContext) -> Iterator[None]:
            """Count the call once it ends: its status, or CANCELLED / UNKNOWN when it ended by an exception
            (an abort has set the context's code already)."""
            code = None
            try:
                yield
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                final = code or context.code() or grpc.StatusCode.OK
                count.labels(name, final.name if isinstance(final, grpc.StatusCode) else str(final)).inc()

        return wrap_handler(handler, around=recorded) or handler  # (every handler here is async)
