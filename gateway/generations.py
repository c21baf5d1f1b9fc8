"""The life of one generation as the gateway sees it: enqueue the job, relay its events, cancel it.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from redis.asyncio import Redis

from gateway.config import GatewayConfig
from gateway.model_card import ModelCard
from gateway.router import EventRouter, Inbox
from gateway.validation import ResolvedRequest
from protos import api, bus
from protos.keys import JOB_FIELD, Keys

log = structlog.get_logger("gateway.generations")


class RequestRejected(Exception):
    """The request cannot be accepted now (a gRPC status other than INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_event(request_id: str, code: grpc.StatusCode, message: str) -> api.GenerateEvent:
    return api.GenerateEvent(request_id=request_id, error=api.Error(code=code.value[0], message=message))


class Generations:
    def __init__(self, redis: Redis, keys: Keys, router: EventRouter, card: ModelCard, config: GatewayConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.router = router
        self.card = card
        self.config = config
        self.active: dict[str, Generation] = {}
        self._background: set[asyncio.Task] = set()

    async def open(self, resolved: ResolvedRequest, timeout_s: float) -> Generation:
        if len(self.active) >= self.config.max_active_streams:
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this gateway has {len(self.active)} requests in flight (limit "
                f"{self.config.max_active_streams}); retry later",
            )
        accepted = time.time()
        deadline = accepted + timeout_s
        request_id = resolved.request_id or uuid.uuid4().hex
        if resolved.request_id:
            # A client-chosen id must not be in flight anywhere (any gateway).
            claimed = await self.redis.set(
                self.keys.request_claim(request_id), b"1", nx=True, ex=max(1, int(timeout_s) + 60)
            )
            if not claimed or request_id in self.active:
                raise RequestRejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is in flight")
        job = bus.Job(
            request_id=request_id,
            reply_channel=self.router.channel,
            prompt_token_ids=resolved.prompt_token_ids,
            params=resolved.params,
            accepted_unix_ms=int(accepted * 1000),
            deadline_unix_ms=int(deadline * 1000),
            tokenizer_fingerprint=self.card.tokenizer_fingerprint,
        )
        inbox = self.router.register(request_id, max_events=resolved.params.max_new_tokens + 8)
        generation = Generation(self, resolved, request_id, inbox, deadline)
        self.active[request_id] = generation
        try:
            await self.redis.xadd(self.keys.jobs, {JOB_FIELD: job.SerializeToString()})
        except BaseException:
            generation.close(cancel=False)
            raise
        log.info("job_enqueued", request_id=request_id, prompt_tokens=len(resolved.prompt_token_ids))
        return generation

    async def cancel(self, request_id: str) -> None:
        """Tell workers to stop the request: pub/sub for running jobs, a key for jobs not yet picked up."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.cancelled(request_id), b"1", ex=self.config.cancel_key_ttl_s)
            pipe.publish(self.keys.cancel_channel, bus.CancelNotice(request_ids=[request_id]).SerializeToString())
            await pipe.execute()
        log.info("cancel_sent", request_id=request_id)

    def spawn(self, coro) -> None:
        """Run a coroutine that must outlive the RPC that started it (e.g. a cancel on disconnect)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


@dataclass
class Generation:
    owner: Generations
    resolved: ResolvedRequest
    request_id: str
    inbox: Inbox
    deadline: float  # time.time() seconds
    finished: bool = False
    closed: bool = False

    async def events(self) -> AsyncIterator[api.GenerateEvent]:
        """Queued, then the worker's events in seq order, ending with Finished or Error."""
        rid = self.request_id
        yield api.GenerateEvent(request_id=rid, queued=api.Queued(prompt_tokens=len(self.resolved.prompt_token_ids)))
        expected_seq = 1
        full_text_pending = self.resolved.return_full_text
        while True:
            event = await self._next()
            if event is None:
                self.finished = True
                self.owner.spawn(self.owner.cancel(rid))
                if self.inbox.broken:
                    yield error_event(rid, grpc.StatusCode.UNAVAILABLE, "lost events on the way from the worker")
                else:
                    yield error_event(rid, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                return
            if event.seq < expected_seq:
                continue  # a duplicate
            if event.seq > expected_seq:
                self.finished = True
                self.owner.spawn(self.owner.cancel(rid))
                yield error_event(rid, grpc.StatusCode.DATA_LOSS, f"events {expected_seq}..{event.seq - 1} were lost")
                return
            expected_seq += 1
            kind = event.WhichOneof("event")
            if kind == "tokens":
                if full_text_pending:
                    event.tokens.text = self.resolved.prompt_text + event.tokens.text
                    full_text_pending = False
                if not self.resolved.return_token_ids:
                    del event.tokens.token_ids[:]
            elif kind in ("finished", "error"):
                self.finished = True
            yield event
            if self.finished:
                return

    async def _next(self) -> api.GenerateEvent | None:
        """The next event; None once the deadline (plus grace) has passed or events were lost."""
        queue = self.inbox.queue
        if not queue.empty():
            return queue.get_nowait()  # the common case under load: no timer to set up
        if self.inbox.broken:
            return None
        timeout = self.deadline + self.owner.config.deadline_grace_s - time.time()
        try:
            async with asyncio.timeout(max(timeout, 0)):
                return await queue.get()
        except TimeoutError:
            return None

    def close(self, cancel: bool = True) -> None:
        """Forget the request; if it has not finished (client left, gateway error), cancel its job."""
        if self.closed:
            return
        self.closed = True
        owner = self.owner
        owner.router.unregister(self.request_id)
        owner.active.pop(self.request_id, None)
        if cancel and not self.finished:
            owner.spawn(owner.cancel(self.request_id))
        if self.resolved.request_id:
            owner.spawn(owner.redis.delete(owner.keys.request_claim(self.request_id)))
