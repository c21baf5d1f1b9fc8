"""The jobs a worker holds, and what happens to them: token chunks, finishes, failures, as events.

Every outcome of a job goes through here, so that the events, the counts (metrics) and the lifecycle log
lines stay in step: a sample's Finished event, the job's final event (which acknowledges it), a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import structlog

from codestream import tracing
from protos import api
from worker import events
from worker.engine import LLMEngine, RequestOutput
from worker.leases import Renewal
from worker.state import Outbox, Running, engine_params

log = structlog.get_logger("worker")


class JobBook:
    def __init__(self) -> None:
        self.requests: dict[str, Running] = {}  # taken from the stream, not yet finished
        # Lifetime counts by outcome (jobs taken, finished by stop reason, fenced, reclaimed...).
        self.counts: Counter[str] = Counter()
        self._freed = asyncio.Event()
        # Jobs put into the engine whose span and log line are not written yet:
        # (job, when, prompt tokens, tokens it resumed from).
        self._unannounced: list[tuple[Running, float, int, int]] = []

    def take(self, req: Running) -> None:
        self.counts["taken"] += 1
        self.requests[req.request_id] = req

    def adopt(self, req: Running) -> bytes | None:
        """`req` is a second delivery of a request held here (the gateway enqueues unstarted jobs again when
        Redis restarts): not a new job, only a new lease for the one running, which heartbeats renew and
        whose final event acknowledges. Returns the entry it replaces, if another, for the caller to release:
        a Redis restarted with its data keeps it, and left pending it would be reclaimed and run twice."""
        held = self.requests[req.request_id]
        superseded = held.entry_id if held.entry_id != req.entry_id else None
        held.entry_id, held.orphaned = req.entry_id, False
        held.attempt = max(held.attempt, req.attempt)  # (a reclaimed entry has claimed a higher attempt)
        self.counts["duplicate_adopted"] += 1
        log.info("duplicate_adopted", request_id=req.request_id, attempt=held.attempt)
        return superseded

    def renewed(self, renewal: Renewal) -> list[Running]:
        """A heartbeat's outcome: the jobs lost to another worker, to drop. Those whose entry Redis lost go
        on here, unleased: dropping them would leave their clients in silence. Their final emit's XACK/XDEL
        of the missing entry are harmless, and a newer attempt, should one appear, still fences them."""
        lost = []
        for req in list(self.requests.values()):
            if req.entry_id in renewal.lost:
                log.warning("lease_lost", request_id=req.request_id)
                self.counts["lease_lost"] += 1
                lost.append(req)
            elif req.entry_id in renewal.orphaned and not req.orphaned:
                req.orphaned = True
                log.warning("lease_orphaned", request_id=req.request_id)
                self.counts["orphaned"] += 1
        return lost

    def start(self, req: Running, engine: LLMEngine) -> None:
        """Put the job into the engine: from its prompt, or, continuing an earlier attempt, each unfinished
        sample from the tokens its client already has (prefilled, not generated again)."""
        params = engine_params(req.job.params, prompt_logprobs=req.job.params.prompt_logprobs and not req.started)
        prompt = list(req.job.prompt_token_ids)
        if not req.started:
            engine.add_request(req.request_id, prompt, params, n=len(req.samples))
        else:
            for index in req.unfinished:
                sample = req.samples[index]
                engine.add_request(req.request_id, prompt, params, sample.generated, sample.sent_text, index=index)
        self.counts["prompt_tokens"] += len(prompt)
        resumed = sum(len(s.generated) for s in req.samples.values())
        self._unannounced.append((req, time.time(), len(prompt), resumed))

    def announce_started(self) -> None:
        """The span and `request_started` line of the jobs started since the last call. The service calls
        this once the step that prefilled them has its events on the way: written before the step, they
        would delay every first token by their ~0.1 ms. A job that ends first is announced before its end."""
        pending, self._unannounced = self._unannounced, []
        for req, started, prompt_tokens, resumed in pending:
            if req.span is None:
                req.span = tracing.start(
                    "codestream.generate", req.job.traceparent, server=False, start_time_ns=int(started * 1e9),
                    request_id=req.request_id, attempt=req.attempt, prompt_tokens=prompt_tokens,
                    samples=len(req.samples),
                )  # fmt: skip
            log.info(
                "request_started", request_id=req.request_id, attempt=req.attempt,
                resumed_tokens=resumed, queue_ms=round(started * 1000 - req.job.accepted_unix_ms, 1),
                traceparent=req.job.traceparent or None,
            )  # fmt: skip

    async def freed(self) -> None:
        """Wait until a job leaves."""
        self._freed.clear()
        await self._freed.wait()

    def collect(self, out: RequestOutput, outbox: Outbox) -> None:
        """One engine output: a token chunk, and the sample's end if it finished."""
        req = self.requests.get(out.request_id)
        if req is None:
            return
        if out.new_token_ids or out.text:
            self.counts["generated_tokens"] += len(out.new_token_ids)
            sample = req.samples[out.index]
            sample.generated.extend(out.new_token_ids)
            sample.sent_text += out.text
            outbox.add(req, events.token_chunk(req.request_id, req.next_seq(), out))
        if out.finished:
            self.end_samples(req, outbox, events.STOP_REASONS[out.finish_reason], [out])

    def end_samples(self, req: Running, outbox: Outbox, stop_reason: int, outs: list[RequestOutput]) -> None:
        """Finished events for these samples; the job ends (and is acknowledged) with its last sample."""
        self.announce_started()
        for out in outs:
            req.samples[out.index].finished = True
            req.stop_reason = api.StopReason.Name(stop_reason)
            self.counts[req.stop_reason] += 1
            done = not req.unfinished
            log.info(
                "request_finished", request_id=req.request_id, index=out.index, reason=api.StopReason.Name(stop_reason),
                generated_tokens=out.num_generated_tokens, traceparent=req.job.traceparent or None,
            )  # fmt: skip
            outbox.add(req, events.finished(req.job, req.next_seq(), stop_reason, out=out), final=done)
        if not req.unfinished:
            self.forget(req)

    def finish_unstarted(self, req: Running, outbox: Outbox, stop_reason: int) -> None:
        """A job that ends before the engine ran it (cancelled, expired): a Finished event per sample."""
        self.counts[f"{api.StopReason.Name(stop_reason)}_before_start"] += 1
        log.info("request_finished", request_id=req.request_id, reason=api.StopReason.Name(stop_reason), started=False)
        indices = req.unfinished
        for index in indices:
            event = events.finished(req.job, req.next_seq(), stop_reason, index=index)
            outbox.add(req, event, final=index == indices[-1])
        self.forget(req)

    def fail(self, req: Running, outbox: Outbox, code: grpc.StatusCode, message: str) -> None:
        self.announce_started()
        log.warning("request_failed", request_id=req.request_id, code=code.name, message=message)
        req.error = f"{code.name}: {message}"
        self.counts[f"failed_{code.name}"] += 1
        outbox.add(req, events.error(req.request_id, req.next_seq(), code, message), final=True)
        self.forget(req)

    def forget(self, req: Running) -> None:
        self.announce_started()
        # Only this copy: ending a stray second copy of a request must not forget the one that runs.
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
        tracing.end(
            req.span, error=req.error, stop_reason=req.stop_reason or None,
            generated_tokens=sum(len(s.generated) for s in req.samples.values()),
        )  # fmt: skip
        req.span = None
        self._freed.set()
