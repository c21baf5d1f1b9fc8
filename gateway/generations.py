"""The generations a gateway has open: enqueue a job (admission), relay its events (generation.py), cancel it,
resume it through any gateway.

generation = await generations.open(resolved, timeout_s)
try:
    async for event in generation.events():   # Queued, token chunks, then Finished or Error
        ...
finally:
    generation.close()                           # cancels the job if it has not finished
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from codestream import tracing
from gateway import event_log
from gateway.admission import Admission, Limits
from gateway.config import GatewayConfig
from gateway.generation import Generation, error_event
from gateway.metrics import GatewayMetrics
from gateway.model_card import ModelCard
from gateway.router import EventRouter
from gateway.validation import ResolvedRequest
from protos import api, bus
from protos.keys import DEADLINE_SLACK_S, Keys

log = structlog.get_logger("gateway.generations")


class RequestRejected(Exception):
    """The request cannot be accepted now (a gRPC status other than INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms


class Generations:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        router: EventRouter,
        card: ModelCard,
        config: GatewayConfig,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.redis = redis
        self.keys = keys
        self.router = router
        self.card = card
        self.config = config
        self.active: dict[str, Generation] = {}
        self._background: set[asyncio.Task] = set()
        self.gateway_id = router.channel.rsplit(":", 1)[-1]
        self.resumed: set[str] = set()  # request ids this gateway streams through Resume now
        limits = Limits(
            config.max_inflight_requests, config.max_inflight_tokens, config.tenant_max_concurrency,
            config.tenant_tokens_per_s, config.tenant_token_burst,
        )  # fmt: skip
        self.admission = Admission(redis, keys, limits, self.gateway_id)
        self.rejected: Counter[str] = Counter()
        router.on_redis_restart.append(lambda: self.spawn(self.requeue_unstarted()))

    async def requeue_unstarted(self) -> None:
        """Redis restarted, perhaps without its data: the jobs no worker had started are gone with it.
        Enqueue them again (their streams have seen nothing yet, so nothing is repeated)."""
        for generation in list(self.active.values()):
            if generation._expected_seq == 1 and not generation.finished:
                tokens = len(generation.resolved.prompt_token_ids) + generation.resolved.params.max_new_tokens
                await self.admission.enqueue(
                    generation.request_id, generation.tenant, generation.job_bytes, tokens, generation.deadline,
                    claim=False,
                )  # fmt: skip
                log.info("job_requeued", request_id=generation.request_id)

    @staticmethod
    def scoped(tenant: str, request_id: str) -> str:
        """The id a request has in Redis and on workers: the client's id inside its tenant's space, so that
        tenants can neither collide with, nor see, nor cancel each other's requests."""
        return f"{tenant}:{request_id}" if tenant else request_id

    async def open(
        self, resolved: ResolvedRequest, timeout_s: float, tenant: str = "", traceparent: str = ""
    ) -> Generation:
        if len(self.active) >= self.config.max_active_streams:
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this gateway has {len(self.active)} requests in flight (limit "
                f"{self.config.max_active_streams}); retry later",
            )
        accepted = time.time()
        deadline = accepted + timeout_s
        client_id = resolved.request_id or uuid.uuid4().hex
        request_id = self.scoped(tenant, client_id)
        if request_id in self.active:
            raise RequestRejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id {client_id!r} is in flight")
        # With OpenTelemetry on, the worker's span becomes a child of this one (same trace as the client's).
        span = tracing.start(
            "codestream.request", traceparent, request_id=request_id, tenant=tenant or None,
            prompt_tokens=len(resolved.prompt_token_ids), max_new_tokens=resolved.params.max_new_tokens,
        )  # fmt: skip
        job = bus.Job(
            request_id=request_id,
            reply_channel=self.router.channel,
            prompt_token_ids=resolved.prompt_token_ids,
            params=resolved.params,
            accepted_unix_ms=int(accepted * 1000),
            deadline_unix_ms=int(deadline * 1000),
            tokenizer_fingerprint=self.card.tokenizer_fingerprint,
            traceparent=tracing.traceparent_of(span, traceparent),
        )
        inbox = self.router.register(request_id, max_events=resolved.params.max_new_tokens + 8)
        generation = Generation(self, resolved, request_id, client_id, tenant, inbox, deadline, span=span)
        generation.job_bytes = job.SerializeToString()
        self.active[request_id] = generation
        self.metrics.active_streams.inc()
        tokens = len(resolved.prompt_token_ids) + resolved.params.max_new_tokens
        try:
            verdict = await self.admission.enqueue(
                request_id, tenant, generation.job_bytes, tokens, deadline, claim=bool(resolved.request_id)
            )
        except BaseException:
            generation.close(cancel=False)
            raise
        if not verdict.admitted:
            generation.admitted = False
            generation.close(cancel=False)
            if verdict.reason == "exists":
                raise RequestRejected(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"request_id {client_id!r} is in flight, or its events are still kept (Resume reads them)",
                )
            self.rejected[verdict.reason] += 1
            self.metrics.rejected.labels(verdict.reason).inc()
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED, verdict.message, retry_after_ms=verdict.retry_after_ms
            )
        # The lifecycle in the log: accepted here, started/finished on the worker, ended here. Never the prompt.
        log.info(
            "request_accepted", request_id=request_id, tenant=tenant, prompt_tokens=len(resolved.prompt_token_ids),
            max_new_tokens=resolved.params.max_new_tokens, traceparent=traceparent or None,
        )  # fmt: skip
        return generation

    async def cancel(self, request_id: str) -> None:
        """Tell workers to stop the request: pub/sub for running jobs, a key for jobs not yet picked up."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.cancelled(request_id), b"1", ex=self.config.cancel_key_ttl_s)
            pipe.publish(self.keys.cancel_channel, bus.CancelNotice(request_ids=[request_id]).SerializeToString())
            await pipe.execute()
        log.info("cancel_sent", request_id=request_id)

    async def cancel_after_grace(self, request_id: str) -> None:
        """The client went away mid-stream. After `disconnect_grace_s` (0: now), cancel the job, unless a
        Resume has taken the stream over meanwhile (through this gateway or another)."""
        grace = self.config.disconnect_grace_s
        if grace > 0:
            await asyncio.sleep(grace)
            attached = await self.redis.get(self.keys.attached(request_id))
            if attached is not None and attached.decode() != self.gateway_id:
                return
            if request_id in self.resumed:
                return
        await self.cancel(request_id)

    async def resume(
        self, client_id: str, after_seq: int, timeout_s: float, tenant: str = ""
    ) -> AsyncIterator[api.GenerateEvent]:
        """The events of a request after `after_seq`, from its log, then live until it ends (any gateway)."""
        keys = self.keys
        request_id = self.scoped(tenant, client_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.attached(request_id), keys.event_log(request_id))
            pipe.set(keys.attached(request_id), self.gateway_id, ex=max(1, int(timeout_s) + DEADLINE_SLACK_S), xx=True)
            known, _ = await pipe.execute()
        if not known:
            raise RequestRejected(grpc.StatusCode.NOT_FOUND, f"request {client_id!r} is unknown or expired")
        self.resumed.add(request_id)
        deadline = time.time() + timeout_s
        finished = False
        try:
            async for event in event_log.follow(self.redis, keys, request_id, after_seq, deadline):
                finished = event.HasField("finished") or event.HasField("error")
                event.request_id = client_id
                yield event
            if not finished:
                yield error_event(client_id, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                finished = True
        finally:
            self.resumed.discard(request_id)
            if not finished:  # this client left too
                self.spawn(self.cancel_after_grace(request_id))

    def spawn(self, coro) -> None:
        """Run a coroutine that must outlive the RPC that started it (e.g. a cancel on disconnect); its
        failure (Redis down) is logged: admissions expire at their deadlines, cancels at the worker's."""
        task = asyncio.create_task(self._logged(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _logged(coro) -> None:
        try:
            await coro
        except (RedisError, OSError) as exc:
            log.warning("background_redis_call_failed", call=getattr(coro, "__qualname__", "?"), error=str(exc))
