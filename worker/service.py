"""The worker process: pulls jobs from Redis, drives the engine, publishes events back.

Three tasks share one event loop:
  intake   XREADGROUP jobs (as many as the engine can take), screen them, queue them for the engine;
  cancels  one subscription to the cancel channel;
  engine   apply queued adds/aborts and expired deadlines, run one engine step in a thread, publish.

Only the engine task touches the engine, between steps, so the engine needs no locks. Publishing a step's
events (one PUBLISH per gateway, plus XACK/XDEL of finished jobs, in one pipeline) overlaps the next step's
compute; publishes are chained so that events reach each gateway in step order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from protos import api, bus
from protos.keys import JOB_FIELD, Keys
from worker import events
from worker.engine import LLMEngine, RequestOutput, SamplingParams

log = structlog.get_logger("worker")


@dataclass
class Running:
    """A job this worker has taken: where its events go and how far its stream is."""

    job: bus.Job
    entry_id: bytes
    seq: int = 0  # last event seq published

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass
class Outbox:
    """Events and finished jobs of one step, grouped for one pipeline."""

    batches: dict[str, list[api.GenerateEvent]] = field(default_factory=lambda: defaultdict(list))
    done_entries: list[bytes] = field(default_factory=list)

    def add(self, req: Running, event: api.GenerateEvent, final: bool = False) -> None:
        self.batches[req.job.reply_channel].append(event)
        if final:
            self.done_entries.append(req.entry_id)

    def __bool__(self) -> bool:
        return bool(self.batches or self.done_entries)


class Worker:
    def __init__(self, engine: LLMEngine, redis: Redis, keys: Keys, worker_id: str, fingerprint: str) -> None:
        self.engine = engine
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.fingerprint = fingerprint
        self.requests: dict[str, Running] = {}  # taken from the stream, not yet finished
        self._to_add: list[Running] = []
        self._to_abort: dict[str, int] = {}  # request id -> api.StopReason
        self._wake = asyncio.Event()
        self._capacity = asyncio.Event()
        self._draining = False
        self._publishing: asyncio.Task | None = None
        # Jobs taken per intake read: enough to keep a full batch plus a queue behind it.
        self.max_taken = 2 * engine.config.max_num_seqs
        # Lifetime counts by outcome (jobs taken, finished by stop reason, refused...), for logs and tests.
        self.counts: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, heartbeat_s: float = 2.0, shutdown_grace_s: float = 60.0) -> None:
        """Serve until `stop` is set, then drain: take no new jobs, finish running ones within the grace."""
        await self._ensure_group()
        tasks = [
            asyncio.create_task(self._intake(), name="intake"),
            asyncio.create_task(self._cancels(), name="cancels"),
            asyncio.create_task(self._heartbeat(heartbeat_s), name="heartbeat"),
        ]
        engine_task = asyncio.create_task(self._engine_loop(), name="engine")
        log.info("worker_ready", worker_id=self.worker_id, num_blocks=self.engine.block_manager.num_blocks)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, engine_task, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        for task in (engine_task, *tasks):
            if task.done() and not task.cancelled() and task.exception():
                log.error("worker_task_failed", task=task.get_name(), error=repr(task.exception()))
        self._draining = True
        tasks[0].cancel()  # no new jobs
        log.info("worker_draining", running=len(self.requests), grace_s=shutdown_grace_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=shutdown_grace_s)
        if self.requests:
            for rid in list(self.requests):
                self._to_abort[rid] = api.STOP_REASON_ERROR
            self._wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained(), timeout=5)
        for task in (engine_task, *tasks):
            task.cancel()
        await asyncio.gather(engine_task, *tasks, return_exceptions=True)
        if self._publishing:
            await asyncio.gather(self._publishing, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self.redis.delete(self.keys.worker(self.worker_id))
        log.info("worker_stopped", worker_id=self.worker_id)

    async def _drained(self) -> None:
        while self.requests:
            self._capacity.clear()
            await self._capacity.wait()

    async def _ensure_group(self) -> None:
        try:
            # From id 0: jobs enqueued before any worker existed are served too.
            await self.redis.xgroup_create(self.keys.jobs, self.keys.worker_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- intake ------------------------------------------------------------------------------------------

    async def _intake(self) -> None:
        keys = self.keys
        while True:
            room = self.max_taken - len(self.requests)
            if room <= 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            try:
                reply = await self.redis.xreadgroup(
                    keys.worker_group, self.worker_id, {keys.jobs: ">"}, count=room, block=1000
                )
            except (RedisError, OSError) as exc:
                log.warning("intake_error", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if reply:
                await self._screen([(entry_id, fields) for _stream, entries in reply for entry_id, fields in entries])

    async def _screen(self, entries: list[tuple[bytes, dict]]) -> None:
        """Take new jobs: refuse the unservable, drop the cancelled and expired, queue the rest."""
        outbox = Outbox()
        taken: list[Running] = []
        for entry_id, fields in entries:
            try:
                job = bus.Job.FromString(fields[JOB_FIELD])
            except Exception:
                log.error("bad_job_entry", entry_id=entry_id)
                outbox.done_entries.append(entry_id)
                continue
            req = Running(job, entry_id)
            self.counts["taken"] += 1
            self.requests[job.request_id] = req  # from here on, a cancel notice finds it
            taken.append(req)
        cancelled = await self.redis.mget([self.keys.cancelled(r.job.request_id) for r in taken]) if taken else []
        now_ms = time.time() * 1000
        for req, cancel_flag in zip(taken, cancelled, strict=True):
            job = req.job
            if job.deadline_unix_ms and now_ms > job.deadline_unix_ms:
                self._finish_unstarted(req, outbox, api.STOP_REASON_DEADLINE)
            elif cancel_flag is not None:
                self._finish_unstarted(req, outbox, api.STOP_REASON_CANCELLED)
            elif job.tokenizer_fingerprint and job.tokenizer_fingerprint != self.fingerprint:
                self._fail(
                    req,
                    outbox,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the worker serves a different tokenizer",
                )
            else:
                self._to_add.append(req)
        if outbox:
            await self._publish(outbox)
        self._wake.set()

    # -- cancels -----------------------------------------------------------------------------------------

    async def _cancels(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
                async for message in pubsub.listen():
                    notice = bus.CancelNotice.FromString(message["data"])
                    for rid in notice.request_ids:
                        if rid in self.requests:
                            self._to_abort[rid] = api.STOP_REASON_CANCELLED
                            self._wake.set()
            except (RedisError, OSError) as exc:
                log.warning("cancel_subscription_lost", error=str(exc))
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- the engine --------------------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        while True:
            outbox = Outbox()
            self._apply_aborts(outbox)
            self._apply_adds(outbox)
            self._expire(outbox)
            if self.engine.has_unfinished():
                try:
                    outputs = await asyncio.to_thread(self.engine.step)
                except Exception as exc:
                    log.exception("engine_step_failed")
                    self._fail_all(outbox, f"engine error: {exc!r}")
                    outputs = []
                for out in outputs:
                    self._collect(out, outbox)
            if outbox:
                self._publishing = asyncio.create_task(self._publish(outbox, after=self._publishing))
            if not self.engine.has_unfinished() and not self._to_add and not self._to_abort:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)

    def _apply_adds(self, outbox: Outbox) -> None:
        adds, self._to_add = self._to_add, []
        for req in adds:
            if req.job.request_id not in self.requests:
                continue  # cancelled while queued
            job = req.job
            p = job.params
            params = SamplingParams(
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                seed=p.seed,
                max_new_tokens=p.max_new_tokens,
                stop=tuple(p.stop),
                ignore_eos=p.ignore_eos,
                logprobs=p.logprobs,
            )
            try:
                self.engine.add_request(job.request_id, list(job.prompt_token_ids), params)
            except ValueError as exc:
                self._fail(req, outbox, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _apply_aborts(self, outbox: Outbox) -> None:
        aborts, self._to_abort = self._to_abort, {}
        for rid, reason in aborts.items():
            req = self.requests.get(rid)
            if req is None:
                continue
            out = self.engine.abort_request(rid)
            if reason == api.STOP_REASON_ERROR:
                self._fail(req, outbox, grpc.StatusCode.UNAVAILABLE, "the worker shut down before finishing")
            elif out is None:  # not in the engine yet
                self._finish_unstarted(req, outbox, reason)
            else:
                self._finish(req, outbox, reason, out)

    def _expire(self, outbox: Outbox) -> None:
        now_ms = time.time() * 1000
        for rid, req in list(self.requests.items()):
            if req.job.deadline_unix_ms and now_ms > req.job.deadline_unix_ms:
                self._to_abort[rid] = api.STOP_REASON_DEADLINE
        if self._to_abort:
            self._apply_aborts(outbox)

    def _collect(self, out: RequestOutput, outbox: Outbox) -> None:
        req = self.requests.get(out.request_id)
        if req is None:
            return
        if out.new_token_ids or out.text:
            outbox.add(req, events.token_chunk(req.job.request_id, req.next_seq(), out))
        if out.finished:
            self._finish(req, outbox, events.STOP_REASONS[out.finish_reason], out)

    def _finish(self, req: Running, outbox: Outbox, stop_reason: int, out: RequestOutput) -> None:
        self.counts[api.StopReason.Name(stop_reason)] += 1
        outbox.add(req, events.finished(req.job, req.next_seq(), stop_reason, out=out), final=True)
        self._forget(req)

    def _finish_unstarted(self, req: Running, outbox: Outbox, stop_reason: int) -> None:
        self.counts[f"{api.StopReason.Name(stop_reason)}_before_start"] += 1
        outbox.add(req, events.finished(req.job, req.next_seq(), stop_reason), final=True)
        self._forget(req)

    def _fail(self, req: Running, outbox: Outbox, code: grpc.StatusCode, message: str) -> None:
        log.warning("request_failed", request_id=req.job.request_id, code=code.name, message=message)
        self.counts[f"failed_{code.name}"] += 1
        outbox.add(req, events.error(req.job.request_id, req.next_seq(), code, message), final=True)
        self._forget(req)

    def _fail_all(self, outbox: Outbox, message: str) -> None:
        for rid, req in list(self.requests.items()):
            self.engine.abort_request(rid)
            self._fail(req, outbox, grpc.StatusCode.INTERNAL, message)

    def _forget(self, req: Running) -> None:
        self.requests.pop(req.job.request_id, None)
        self._capacity.set()

    # -- publishing --------------------------------------------------------------------------------------

    async def _publish(self, outbox: Outbox, after: asyncio.Task | None = None) -> None:
        """One pipeline: one PUBLISH per gateway, then XACK + XDEL of the jobs whose final event it carries
        (a job is acknowledged only once its final event is out)."""
        if after is not None:
            await asyncio.gather(after, return_exceptions=True)
        keys = self.keys
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for channel, evs in outbox.batches.items():
                    pipe.publish(channel, bus.EventBatch(worker_id=self.worker_id, events=evs).SerializeToString())
                if outbox.done_entries:
                    pipe.xack(keys.jobs, keys.worker_group, *outbox.done_entries)
                    pipe.xdel(keys.jobs, *outbox.done_entries)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.error("publish_failed", error=str(exc), gateways=len(outbox.batches))

    async def _heartbeat(self, every_s: float) -> None:
        while True:
            stats = self.engine.stats()
            info = {
                "worker_id": self.worker_id,
                "running": stats.num_running,
                "waiting": stats.num_waiting,
                "free_blocks": stats.num_free_blocks,
                "blocks": stats.num_blocks,
                "time": time.time(),
            }
            with contextlib.suppress(RedisError, OSError):
                await self.redis.set(self.keys.worker(self.worker_id), json.dumps(info), ex=max(1, int(3 * every_s)))
            await asyncio.sleep(every_s)
