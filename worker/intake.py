"""Taking jobs: new ones from the stream (XREADGROUP, as many as there is room for) and abandoned ones from
workers that stopped renewing their leases (reclaimed, continued from their event logs). Each is screened
before the engine gets it: expired, for another tokenizer, or cancelled while it was queued.

The worker (service.py) owns the engine; an Intake hands it jobs through `start` and endings through `stop`,
and sends the events of jobs that end here through `emit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from protos import api, bus
from protos.keys import EVENT_FIELD, JOB_FIELD, STALE_JOB_S, Keys
from worker.emitter import Emitter
from worker.jobs import JobBook
from worker.leases import Claimed, Leases
from worker.state import Outbox, Running

log = structlog.get_logger("worker")


class Intake:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        worker_id: str,
        fingerprint: str,
        leases: Leases,
        emitter: Emitter,
        book: JobBook,
        *,
        max_taken: int,
        lease_s: float,
        start: Callable[[Running], None],
        stop: Callable[[str, int], None],
        emit: Callable[[Outbox], Awaitable[None]],
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.fingerprint = fingerprint
        self.leases = leases
        self.emitter = emitter
        self.book = book
        self.max_taken = max_taken  # jobs held at once (running or queued for the engine)
        self.lease_s = lease_s
        self._start = start  # a screened job, for the engine
        self._stop = stop  # (request id, stop reason): end a job taken already
        self._emit = emit  # events of jobs that end here (retried while Redis is unreachable)

    async def ensure_group(self) -> None:
        try:
            # From id 0: jobs enqueued before any worker existed are served too.
            await self.redis.xgroup_create(self.keys.jobs, self.keys.worker_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _room(self) -> int:
        while (room := self.max_taken - len(self.book.requests)) <= 0:
            await self.book.freed()
        return room

    async def new_jobs(self) -> None:
        """Read new jobs from the stream, as many as there is room for, until cancelled."""
        keys = self.keys
        while True:
            room = await self._room()
            try:
                reply = await self.redis.xreadgroup(
                    keys.worker_group, self.worker_id, {keys.jobs: ">"}, count=room, block=1000
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    log.warning("intake_error", error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                # Redis lost the stream and its group (restarted without persistence): make them again.
                log.warning("jobs_group_recreated", error=str(exc))
                await self.ensure_group()
                continue
            except (RedisError, OSError) as exc:
                log.warning("intake_error", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            taken = []
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    req = await self._parse(entry_id, fields)
                    if req is not None:
                        taken.append(req)
            if taken:
                await self._screen(taken)

    async def reclaimed_jobs(self) -> None:
        """Now and then, take over the jobs of workers that stopped renewing their leases."""
        while True:
            await asyncio.sleep(self.lease_s / 2)
            try:
                claimed = await self.leases.reclaim(await self._room())
                resumed = [req for c in claimed if (req := await self._resume(c)) is not None]
            except (RedisError, OSError) as exc:
                log.warning("reclaim_error", error=str(exc))
                continue
            if resumed:
                await self._screen(resumed)

    async def _parse(self, entry_id: bytes, fields: dict, attempt: int = 1) -> Running | None:
        try:
            job_bytes = fields[JOB_FIELD]
            return Running(bus.Job.FromString(job_bytes), entry_id, job_bytes, attempt=attempt)
        except Exception:
            log.error("bad_job_entry", entry_id=entry_id)
            await self.leases.release([entry_id])
            return None

    async def _resume(self, claimed: Claimed) -> Running | None:
        """A job taken over from a dead worker: dead-letter it if it has failed too often, else continue it
        from its event log (the tokens the client already has are prefilled, not generated again)."""
        req = await self._parse(claimed.entry_id, {JOB_FIELD: claimed.job_bytes}, attempt=claimed.deliveries)
        if req is None or not await self._drop_stale([req]):
            return None  # (a stale one before its attempt is raised: the id may be another request's now)
        rid = req.request_id
        self.book.counts["reclaimed"] += 1
        if claimed.deliveries > self.leases.max_deliveries:
            reason = "too many deliveries"
            await self.leases.dead_letter(claimed.job_bytes, claimed.entry_id, claimed.deliveries, reason)
            outbox = Outbox()
            req.seq = max(await self.emitter.claim(rid, req.attempt), 0)
            self.book.fail(req, outbox, grpc.StatusCode.ABORTED, f"the job failed on {claimed.deliveries - 1} workers")
            await self._emit(outbox)
            self.book.counts["dead_lettered"] += 1
            return None
        last_seq = await self.emitter.claim(rid, req.attempt)
        if last_seq < 0:
            return None  # a newer attempt runs it
        req.seq = last_seq
        logged = await self.redis.xrange(self.keys.event_log(rid), "-", f"{last_seq}-0")
        req.restore(api.GenerateEvent.FromString(fields[EVENT_FIELD]) for _entry_id, fields in logged)
        if not req.unfinished:
            await self.redis.xack(self.keys.jobs, self.keys.worker_group, claimed.entry_id)
            return None  # it had finished; only the acknowledgement was missing
        tokens = sum(len(s.generated) for s in req.samples.values())
        log.info("job_resumed", request_id=rid, attempt=req.attempt, seq=last_seq, tokens=tokens)
        return req

    async def _drop_stale(self, taken: list[Running]) -> list[Running]:
        """Drop, without an event, the jobs read long past their deadlines (no worker ran them for that long):
        their streams ended long ago, and their client ids may be other requests' by now (see STALE_JOB_S).
        Finishing one would log its Finished under an id that a new request may hold, or make the new job
        look like its second delivery. Returns the others."""
        limit_ms = (time.time() - STALE_JOB_S) * 1000
        kept, stale = [], []
        for req in taken:
            (stale if req.job.deadline_unix_ms and req.job.deadline_unix_ms < limit_ms else kept).append(req)
        for req in stale:
            late_s = round(time.time() - req.job.deadline_unix_ms / 1000, 1)
            log.warning("stale_job_dropped", request_id=req.request_id, seconds_past_deadline=late_s)
        if stale:
            self.book.counts["stale_dropped"] += len(stale)
            with contextlib.suppress(RedisError, OSError):  # (left pending, a reclaim finds it stale again)
                await self.leases.release([req.entry_id for req in stale])
        return kept

    async def _screen(self, taken: list[Running]) -> None:
        """Refuse the unservable, drop the expired, queue the rest for the engine at once; then drop those
        whose client cancelled before this worker took them (a flag in Redis, read after queueing so that its
        round trip is not on every request's time to first token: a cancelled job is rare, and at worst it
        computes a step or two before it is stopped, unseen by its client, who has gone)."""
        taken = await self._drop_stale(taken)
        fresh: list[Running] = []
        superseded: list[bytes] = []
        for req in taken:
            if req.request_id in self.book.requests:  # not a new job: a new lease for the one running
                if (entry_id := self.book.adopt(req)) is not None:
                    superseded.append(entry_id)
            else:
                self.book.take(req)  # from here on, a cancel notice finds it
                fresh.append(req)
        outbox = Outbox()
        now_ms = time.time() * 1000
        for req in fresh:
            job = req.job
            if job.deadline_unix_ms and now_ms > job.deadline_unix_ms:
                self.book.finish_unstarted(req, outbox, api.STOP_REASON_DEADLINE)
            elif job.tokenizer_fingerprint and job.tokenizer_fingerprint != self.fingerprint:
                message = "the worker serves a different tokenizer"
                self.book.fail(req, outbox, grpc.StatusCode.FAILED_PRECONDITION, message)
            else:
                self._start(req)
        if outbox:
            await self._emit(outbox)
        with contextlib.suppress(RedisError, OSError):
            await self.leases.release(superseded)
        if not fresh:
            return
        await asyncio.sleep(0)  # the engine loop first: it starts these jobs, then the flags are read
        try:
            flags = await self.redis.mget([self.keys.cancelled(r.request_id) for r in fresh])
        except (RedisError, OSError) as exc:
            log.warning("cancel_flags_unread", error=str(exc), requests=len(fresh))
            return
        for req, cancel_flag in zip(fresh, flags, strict=True):
            # (Unless it ended meanwhile: expired, cancelled by a notice; it has had its final event.)
            if cancel_flag is not None and self.book.requests.get(req.request_id) is req:
                self._stop(req.request_id, api.STOP_REASON_CANCELLED)
