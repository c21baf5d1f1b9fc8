"""One generation as the gateway relays it: its events in seq order from the request's inbox, gaps and lost
subscriptions repaired from the request's event log, chunks waiting for a slow reader merged, the outcome
in metrics, the log and the trace. Generations (generations.py) opens and closes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from redis.exceptions import RedisError

from codestream import tracing
from gateway import event_log
from gateway.router import Inbox
from gateway.validation import ResolvedRequest
from protos import api

if TYPE_CHECKING:
    from gateway.generations import Generations

log = structlog.get_logger("gateway.generations")

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# A stream that has heard nothing for this long looks in the request's event log (then 2x, 4x... up to max).
IDLE_CHECK_FIRST_S = 0.5
IDLE_CHECK_MAX_S = 5.0


def error_event(request_id: str, code: grpc.StatusCode, message: str) -> api.GenerateEvent:
    return api.GenerateEvent(request_id=request_id, error=api.Error(code=code.value[0], message=message))


@dataclass
class Generation:
    owner: Generations
    resolved: ResolvedRequest
    request_id: str  # in Redis and on workers (tenant-scoped)
    client_id: str  # as the client knows it
    tenant: str
    inbox: Inbox
    deadline: float  # time.time() seconds
    finished: bool = False
    closed: bool = False
    repaired_events: int = 0  # events recovered from the log after pub/sub lost them
    merged_events: int = 0  # token chunks folded into an earlier one (the client read slower than they came)
    span: Any = None  # the request's OpenTelemetry span (codestream/tracing.py), when tracing is on
    error: str = ""  # the error event's status and message, when the stream ended with one
    admitted: bool = True
    lost: bool = False
    job_bytes: bytes = b""
    _expected_seq: int = 1
    _held: list[api.GenerateEvent | None] = field(default_factory=list)  # taken from the inbox, not yet handled
    last_event_at: float = field(default_factory=time.monotonic)
    accepted_at: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0

    async def events(self) -> AsyncIterator[api.GenerateEvent]:
        """Queued, then the worker's events in seq order, ending with Finished or Error. Pub/sub is
        at-most-once: a gap in seq, or a lost subscription, is repaired from the request's event log."""
        rid = self.client_id
        queued = api.Queued(
            prompt_tokens=len(self.resolved.prompt_token_ids),
            truncated_prompt_tokens=self.resolved.truncated_prompt_tokens,
        )
        yield api.GenerateEvent(request_id=rid, queued=queued)
        self._expected_seq = 1
        self._samples_left = max(1, self.resolved.params.n)
        self._full_text_pending = self.resolved.return_full_text
        while not self.finished:
            event = await self._next()
            if event is None:
                if self.inbox.broken and time.time() < self.deadline and not self.lost:
                    repaired = await self._repair_after_outage()
                    if repaired is not None:
                        for e in repaired:
                            if (out := self._accept(e)) is not None:
                                yield out
                        continue
                    error = error_event(rid, grpc.StatusCode.UNAVAILABLE, "lost the event stream (Redis unreachable)")
                elif self.lost:
                    error = error_event(rid, grpc.StatusCode.UNAVAILABLE, "the job was lost when Redis restarted")
                else:
                    error = error_event(rid, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                self.finished = True
                self.owner.spawn(self.owner.cancel(self.request_id))
                yield error
                return
            if event.seq > self._expected_seq:
                # Missed pub/sub messages: the log has them.
                missing = await event_log.read_range(
                    self.owner.redis, self.owner.keys, self.request_id, self._expected_seq, event.seq - 1
                )
                if [e.seq for e in missing] != list(range(self._expected_seq, event.seq)):
                    self.finished = True
                    self.owner.spawn(self.owner.cancel(self.request_id))
                    message = f"events {self._expected_seq}..{event.seq - 1} were lost"
                    yield error_event(rid, grpc.StatusCode.DATA_LOSS, message)
                    return
                self.repaired_events += len(missing)
                self.owner.metrics.repaired_events.inc(len(missing))
                for e in missing:
                    yield self._accept(e)
            if (out := self._accept(event)) is not None:
                if out.HasField("tokens"):
                    self._merge_waiting(out)
                yield out

    def _merge_waiting(self, event: api.GenerateEvent) -> None:
        """Fold the chunks of the same sample that already wait in the inbox, in seq order, into `event`.

        One gRPC message costs the gateway far more than one token (~70 µs of grpc.aio's send path against a
        few µs of routing), so a client that reads slower than tokens come would cap the whole gateway at one
        message per token. Merging only what has already arrived never delays a token: a client that keeps
        up gets one message per step; one that lags gets fewer, larger messages and catches up."""
        queue = self.inbox.queue
        first_seq = event.seq
        chunk = event.tokens
        keep_ids = self.resolved.return_token_ids
        while not queue.empty():
            waiting = queue.get_nowait()
            if (
                waiting is None
                or waiting.seq != self._expected_seq
                or waiting.index != event.index
                or not waiting.HasField("tokens")
            ):
                self._held.append(waiting)  # _next() hands it out first
                break
            more = waiting.tokens
            if keep_ids:
                chunk.token_ids.extend(more.token_ids)
            chunk.text += more.text
            if more.logprobs:
                chunk.logprobs.extend(more.logprobs)
            event.seq = waiting.seq
            self._expected_seq = waiting.seq + 1
        if event.seq != first_seq:
            event.first_seq = first_seq
            self.merged_events += event.seq - first_seq

    def _accept(self, event: api.GenerateEvent) -> api.GenerateEvent | None:
        """The next event in seq order, shaped for the client; None for a duplicate."""
        if event.seq < self._expected_seq:
            return None
        self._expected_seq = event.seq + 1
        self.last_event_at = time.monotonic()
        event.request_id = self.client_id
        kind = event.WhichOneof("event")
        metrics = self.owner.metrics
        if kind == "tokens":
            now = self.last_event_at
            if self.last_token_at:
                metrics.inter_token_latency.observe(now - self.last_token_at)
            else:
                metrics.time_to_first_token.observe(now - self.accepted_at)
            self.last_token_at = now
            if self._full_text_pending:
                event.tokens.text = self.resolved.prompt_text + event.tokens.text
                self._full_text_pending = False
            if not self.resolved.return_token_ids:
                del event.tokens.token_ids[:]
        elif kind == "finished" and self._samples_left > 1:
            self._samples_left -= 1  # (sampling.n > 1) more samples to come
        elif kind in ("finished", "error"):
            self.finished = True
            if kind == "error":
                self.error = f"{STATUS_NAMES.get(event.error.code, event.error.code)}: {event.error.message}"
            metrics.request_duration.observe(self.last_event_at - self.accepted_at)
            if kind == "finished" and event.finished.timings.queue_ms:
                metrics.queue_time.observe(event.finished.timings.queue_ms / 1000)
        return event

    async def _repair_after_outage(self) -> list[api.GenerateEvent] | None:
        """The subscription broke: wait (bounded) for the router to resubscribe, then read what was missed
        from the log. None if Redis stays unreachable."""
        owner = self.owner
        bound = min(self.deadline, time.time() + owner.config.outage_bound_s) - time.time()
        try:
            async with asyncio.timeout(max(bound, 0)):
                await owner.router.subscribed.wait()
                self.inbox.broken = False  # events from here on arrive live again
                return await event_log.read_range(owner.redis, owner.keys, self.request_id, self._expected_seq)
        except (TimeoutError, RedisError, OSError):
            return None

    async def _next(self) -> api.GenerateEvent | None:
        """The next event; None once the deadline (plus grace) has passed or events may have been lost.
        While nothing arrives, the log is checked now and then (backing off): the one message pub/sub lost
        may be the last one, and then no later event would reveal the gap."""
        queue = self.inbox.queue
        idle_check = IDLE_CHECK_FIRST_S
        while True:
            if self._held:
                event = self._held.pop()
            elif not queue.empty():
                event = queue.get_nowait()  # the common case under load: no timer to set up
            elif self.inbox.broken:
                return None
            else:
                remaining = self.deadline + self.owner.config.deadline_grace_s - time.time()
                if remaining <= 0:
                    return None
                try:
                    async with asyncio.timeout(min(remaining, idle_check)):
                        event = await queue.get()
                except TimeoutError:
                    logged = await self._logged_since_expected()
                    if logged:
                        return logged
                    if self._lost_in_restart():
                        self.inbox.broken = self.lost = True
                        return None
                    idle_check = min(idle_check * 2, IDLE_CHECK_MAX_S)
                    continue
            if event is not None:
                return event
            if self.inbox.broken:
                return None  # the router's wake-up: the subscription broke
            # else a wake-up from an outage already repaired: keep reading

    def _lost_in_restart(self) -> bool:
        """Redis restarted after this stream's last event and nothing has come since, for longer than the
        outage bound: the worker lost the job with Redis' data (jobs not started are enqueued again)."""
        restarted = self.owner.router.redis_restarted_at
        return (
            self._expected_seq > 1
            and restarted > self.last_event_at
            and time.monotonic() - restarted > self.owner.config.outage_bound_s
        )

    async def _logged_since_expected(self) -> api.GenerateEvent | None:
        """The first logged event this stream has not seen (the rest follow through the gap repair)."""
        try:
            logged = await event_log.read_range(
                self.owner.redis, self.owner.keys, self.request_id, self._expected_seq, self._expected_seq + 1
            )
        except (RedisError, OSError):
            return None
        if logged:
            self.repaired_events += 1
            self.owner.metrics.repaired_events.inc()
        return logged[0] if logged else None

    def close(self, cancel: bool = True) -> None:
        """Forget the request; if it has not finished (client left, gateway error), cancel its job."""
        if self.closed:
            return
        self.closed = True
        owner = self.owner
        log.info(
            "request_ended", request_id=self.request_id, finished=self.finished,
            client_left=cancel and not self.finished, events=self._expected_seq - 1,
            repaired_events=self.repaired_events, merged_events=self.merged_events,
            seconds=round(time.monotonic() - self.accepted_at, 4),
        )  # fmt: skip
        tracing.end(
            self.span, error=self.error or ("" if self.finished or not self.admitted else "client left"),
            finished=self.finished, admitted=self.admitted, events=self._expected_seq - 1,
            merged_events=self.merged_events, repaired_events=self.repaired_events,
        )  # fmt: skip
        owner.router.unregister(self.request_id)
        if owner.active.pop(self.request_id, None) is not None:
            owner.metrics.active_streams.dec()
        if self.admitted:
            owner.spawn(owner.admission.release(self.request_id, self.tenant))
        if cancel and not self.finished:
            owner.spawn(owner.cancel_after_grace(self.request_id))
        # A client-chosen id's claim is left to expire (past the request's deadline), not deleted: until then
        # its job may still be in a worker, and a new job under the same id would be taken for it.
