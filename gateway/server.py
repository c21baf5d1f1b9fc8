"""The gateway process: a grpc.aio server in front of the Redis job stream.

Start-up order matters: subscribe to this gateway's reply channel *before* serving, so that no event of
an accepted request can arrive unheard. Shutdown: health goes NOT_SERVING (load balancers stop sending),
new calls are refused, in-flight streams get `shutdown_grace_s` to finish, then the rest are cancelled.
The HTTP API (`--http-port`, gateway/http/), when on, runs in the same loop on the same Generations and
drains alongside the gRPC server.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import uuid
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError

from codestream import redis_client
from gateway.auth import ApiKeyInterceptor, ApiKeys, load_api_keys, server_credentials
from gateway.config import GatewayConfig
from gateway.decoding import DecodingInterceptor
from gateway.generations import Generations
from gateway.http import HttpApi, ssl_context
from gateway.metrics import GatewayMetrics, MetricsInterceptor
from gateway.model_card import ModelCard
from gateway.router import EventRouter
from gateway.servicer import CodeStreamServicer
from protos import api, api_grpc
from protos.keys import Keys

log = structlog.get_logger("gateway")

SERVICE_NAME = api.DESCRIPTOR.services_by_name["CodeStream"].full_name


@dataclass
class Gateway:
    config: GatewayConfig
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    redis: Redis
    router: EventRouter
    generations: Generations
    port: int
    gateway_id: str
    api_keys: ApiKeys | None = None  # None: authentication off
    http: HttpApi | None = None  # None: --http-port 0
    http_port: int = 0

    async def stop(self, grace_s: float | None = None, delay_s: float | None = None) -> None:
        """NOT_SERVING; after `delay_s` (time for load balancers to notice) refuse new calls; give in-flight
        ones `grace_s` to finish, then cancel them."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        delay = self.config.shutdown_delay_s if delay_s is None else delay_s
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.serving = False  # its /health, as gRPC's health
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        await self.router.stop()
        await self.redis.aclose()
        log.info("gateway_stopped", gateway_id=self.gateway_id)


async def start_gateway(config: GatewayConfig, model_dir: str, model_id: str | None = None) -> Gateway:
    """Start a gateway on config.host:config.port (port 0: a free one, see Gateway.port)."""
    card = ModelCard.load(model_dir, model_id=model_id or config.model, max_model_len=config.max_model_len)
    # Keys and certificates first: a misconfigured gateway should fail before it touches Redis.
    api_keys = load_api_keys(config)
    credentials = server_credentials(config)
    keys = Keys(config.namespace)
    gateway_id = uuid.uuid4().hex[:12]
    redis = redis_client.connect(config.redis_url)
    try:
        await _check_redis_credentials(redis, config)
    except BaseException:
        await redis.aclose()
        raise
    router = EventRouter(redis, keys.gateway_channel(gateway_id))
    await router.start()
    metrics = GatewayMetrics()
    generations = Generations(redis, keys, router, card, config, metrics)

    server = grpc.aio.server(
        # Metrics outermost, so that refused calls are counted too; decoding innermost, so that a refused
        # caller's bytes are never parsed.
        interceptors=[
            MetricsInterceptor(metrics),
            *([ApiKeyInterceptor(api_keys)] if api_keys is not None else []),
            DecodingInterceptor(),
        ],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 16 * 2**20),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Long-lived HTTP/2 connections pin clients to one gateway; an age limit makes them reconnect (and
            # rebalance over the gateways) without cutting the streams in flight.
            *(
                [
                    ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
                ]
                if config.max_connection_age_s > 0
                else []
            ),
        ],
    )
    api_grpc.add_CodeStreamServicer_to_server(CodeStreamServicer(generations, card, config), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    http, http_port = None, 0
    if config.http_port:
        # Same Generations (queue, admission, deadlines, cancellation), card, API keys and metrics registry.
        http = HttpApi(generations, card, config, api_keys)
        try:
            http_port = await http.start(config.host, config.http_port, ssl_context(config))
        except BaseException:
            await server.stop(0)
            await router.stop()
            await redis.aclose()
            raise
    metrics.serve(config.metrics_port)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "gateway_serving",
        port=port,
        http_port=http_port or None,
        gateway_id=gateway_id,
        model=card.model_id,
        redis=_safe_url(config),
        tls="mtls" if config.tls_client_ca_file else "tls" if credentials else "off",
        auth="api-keys" if api_keys is not None else "off",
        grpc_experiments=os.environ.get("GRPC_EXPERIMENTS", ""),  # (codestream/grpc_io.py)
    )
    return Gateway(
        config, server, health_servicer, redis, router, generations, port, gateway_id, api_keys, http, http_port
    )


async def run_gateway(config: GatewayConfig, model_dir: str) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    gateway = await start_gateway(config, model_dir)
    # What start-up built (tokenizer, protobuf descriptors, gRPC server) lives for good: out of the
    # collector's view, so that collections on a request's path stay short.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway_draining", active=len(gateway.generations.active), grace_s=config.shutdown_grace_s)
    await gateway.stop()


async def _check_redis_credentials(redis: Redis, config: GatewayConfig) -> None:
    """Fail at start-up, with a message that says so, when Redis refuses our credentials; otherwise the
    event router would retry its subscription forever. An unreachable Redis is not an error here: the
    router keeps retrying until it comes."""
    try:
        await asyncio.wait_for(redis.ping(), timeout=5)
    except AuthenticationError as exc:
        raise RuntimeError(
            f"Redis at {_safe_url(config)} refused this gateway's credentials ({exc}); "
            "put user:password@ in --redis-url (CODESTREAM_REDIS_URL)"
        ) from None
    except (RedisError, OSError, TimeoutError):
        pass


def _safe_url(config: GatewayConfig) -> str:
    """The Redis URL without its password, for logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(config.redis_url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"
