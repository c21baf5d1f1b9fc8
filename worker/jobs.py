"""The jobs a worker holds, and what happens to them: token chunks, finishes, failures, as events.

Every outcome of a job goes through here, so that the events, the counts (metrics) and the lifecycle log
lines stay in step: a sample's Finished event, the job's final event (which acknowledges it), a failure.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import structlog

from protos import api
from worker import events
from worker.engine import RequestOutput
from worker.state import Outbox, Running

log = structlog.get_logger("worker")


class JobBook:
    def __init__(self) -> None:
        self.requests: dict[str, Running] = {}  # taken from the stream, not yet finished
        # Lifetime counts by outcome (jobs taken, finished by stop reason, fenced, reclaimed...).
        self.counts: Counter[str] = Counter()
        self._freed = asyncio.Event()

    def take(self, req: Running) -> None:
        self.counts["taken"] += 1
        self.requests[req.request_id] = req

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
        for out in outs:
            req.samples[out.index].finished = True
            self.counts[api.StopReason.Name(stop_reason)] += 1
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
        log.warning("request_failed", request_id=req.request_id, code=code.name, message=message)
        self.counts[f"failed_{code.name}"] += 1
        outbox.add(req, events.error(req.request_id, req.next_seq(), code, message), final=True)
        self.forget(req)

    def forget(self, req: Running) -> None:
        self.requests.pop(req.request_id, None)
        self._freed.set()
