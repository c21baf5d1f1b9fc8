"""The worker process: pulls jobs from Redis, drives the engine, publishes events back.

Tasks sharing one event loop:
  intake     XREADGROUP new jobs (as many as the engine can take), screen them, queue them for the engine;
  reclaim    take over jobs whose worker stopped renewing its lease, continuing them where they were
             (these two: intake.py);
  heartbeat  renew this worker's leases (and drop jobs it lost), refresh its liveness key;
  cancels    one subscription to the cancel channel;
  engine     apply queued adds/aborts and expired deadlines, run one engine step (on the engine thread, or
             on this loop when nothing else runs), emit.

Only the engine task touches the engine, between steps, so the engine needs no locks. A step's events go
out in one script call (emitter.py) while the next step computes; emits are chained, so events reach each
gateway in step order, and the engine never runs more than one step ahead of what Redis has accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from codestream import busy_poll
from protos import api, bus
from protos.keys import Keys
from worker.emitter import Emitter
from worker.engine import LLMEngine, RequestOutput
from worker.intake import Intake
from worker.jobs import JobBook
from worker.leases import Held, Leases
from worker.metrics import LoopTime, Turn, WorkerMetrics
from worker.state import Outbox, Running

log = structlog.get_logger("worker")

DROP = -1  # a queued abort that emits nothing: the job is someone else's now (lease lost, handed back)


class Worker:
    def __init__(
        self,
        engine: LLMEngine,
        redis: Redis,
        keys: Keys,
        worker_id: str,
        fingerprint: str,
        *,
        lease_s: float = 15.0,
        max_deliveries: int = 5,
        event_log_ttl_s: int = 600,
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.leases = Leases(redis, keys, worker_id, lease_s, max_deliveries)
        self.emitter = Emitter(redis, keys, event_log_ttl_s)
        self.book = JobBook()  # the jobs taken, and their outcomes
        # Jobs held at once: enough to keep a full batch plus a queue behind it.
        self.intake = Intake(
            redis, keys, worker_id, fingerprint, self.leases, self.emitter, self.book,
            max_taken=2 * engine.config.max_num_seqs, lease_s=lease_s,
            start=self._queue_start, stop=self._queue_stop, emit=self._emit,
        )  # fmt: skip
        self._to_add: list[Running] = []
        self._to_abort: dict[str, int] = {}  # request id -> api.StopReason, or DROP
        self._wake = asyncio.Event()
        self._draining = False
        self._publishing: asyncio.Task | None = None
        # Where the engine loop's turns that ran a step spend their time (metrics.py, engine_time).
        self.loop_time = LoopTime()
        self.tasks: list[asyncio.Task] = []
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.metrics = WorkerMetrics(self)

    @property
    def requests(self) -> dict[str, Running]:
        return self.book.requests

    @property
    def counts(self) -> Counter[str]:
        return self.book.counts

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, heartbeat_s: float = 2.0, shutdown_grace_s: float = 60.0) -> None:
        """Serve until `stop` is set, then drain: take no new jobs, finish running ones within the grace,
        hand the rest back for other workers to continue."""
        await self.intake.ensure_group()
        feeders = [
            asyncio.create_task(self.intake.new_jobs(), name="intake"),
            asyncio.create_task(self.intake.reclaimed_jobs(), name="reclaim"),
        ]
        helpers = [
            asyncio.create_task(self._cancels(), name="cancels"),
            asyncio.create_task(self._heartbeat(heartbeat_s), name="heartbeat"),
        ]
        engine_task = asyncio.create_task(self._engine_loop(), name="engine")
        self.tasks = [engine_task, *feeders, *helpers]  # (tests cancel them all to play a crashed worker)
        log.info("worker_ready", worker_id=self.worker_id, num_blocks=self.engine.block_manager.num_blocks)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, engine_task, *feeders, *helpers}, return_when=asyncio.FIRST_COMPLETED)
        for task in (engine_task, *feeders, *helpers):
            if task.done() and not task.cancelled() and task.exception():
                log.error("worker_task_failed", task=task.get_name(), error=repr(task.exception()))
        self._draining = True
        for task in feeders:
            task.cancel()  # no new jobs from here on
        log.info("worker_draining", running=len(self.requests), grace_s=shutdown_grace_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=shutdown_grace_s)
        if self.requests:
            await self._hand_back_all()
        for task in (engine_task, *feeders, *helpers):
            task.cancel()
        await _settle([engine_task, *feeders, *helpers], "cancelled", timeout_s=5)
        self._engine_thread.shutdown(wait=False)  # a step still computing there finishes on its own
        if self._publishing:
            await _settle([self._publishing], "final events", timeout_s=5)
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.redis.delete(self.keys.worker(self.worker_id)), timeout=2)
        log.info("worker_stopped", worker_id=self.worker_id, counts=dict(self.counts))

    def _queue_start(self, req: Running) -> None:
        """(Intake) a screened job, for the engine loop to add before its next step."""
        self._to_add.append(req)
        self._wake.set()

    def _queue_stop(self, request_id: str, stop_reason: int) -> None:
        """(Intake) a job to end before the engine's next step (unless another ending is queued already)."""
        self._to_abort.setdefault(request_id, stop_reason)
        self._wake.set()

    async def _drained(self) -> None:
        while self.requests:
            await self.book.freed()

    async def _hand_back_all(self) -> None:
        """Past the grace period: stop the remaining jobs here without a final event and let other workers
        continue them from their event logs. A job whose entry Redis lost (restarted without persistence)
        has nothing to hand back: it is enqueued anew, or its stream would go silent until its deadline."""
        remaining = list(self.requests.values())
        for req in remaining:
            self._to_abort[req.request_id] = DROP
        self._wake.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=5)
        leased = [r.entry_id for r in remaining if not r.orphaned]
        orphans = [r.job_bytes for r in remaining if r.orphaned]
        with contextlib.suppress(RedisError, OSError):
            await self.leases.hand_back(leased)
        with contextlib.suppress(RedisError, OSError):
            await self.leases.enqueue_again(orphans)
        self.counts["handed_back"] += len(leased)
        self.counts["requeued"] += len(orphans)
        log.info("jobs_handed_back", count=len(leased), requeued=len(orphans))

    # -- cancels and liveness ----------------------------------------------------------------------------

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

    async def _heartbeat(self, every_s: float) -> None:
        while True:
            try:
                held = [Held(r.entry_id, r.request_id, r.attempt) for r in self.requests.values()]
                for req in self.book.renewed(await self.leases.renew(held)):
                    self._to_abort[req.request_id] = DROP
                    self._wake.set()
                stats = self.engine.stats()
                info = {"worker_id": self.worker_id, "running": stats.num_running, "waiting": stats.num_waiting}
                info |= {"free_blocks": stats.num_free_blocks, "blocks": stats.num_blocks, "time": time.time()}
                await self.redis.set(self.keys.worker(self.worker_id), json.dumps(info), ex=max(1, int(3 * every_s)))
            except (RedisError, OSError) as exc:
                log.warning("heartbeat_error", error=str(exc))
            await asyncio.sleep(every_s)

    # -- the engine --------------------------------------------------------------------------------------

    async def _in_engine_thread(self, fn):
        """Run an engine call on the engine's own thread, so this loop keeps publishing and taking jobs
        meanwhile. One long-lived thread (not asyncio.to_thread's pool and context copy per step): every
        step pays the hand-over twice, on every stream's token latency. A busy-polling loop sleeps
        meanwhile, or it would keep the GIL from the engine thread (codestream/busy_poll.py)."""
        with busy_poll.paused():
            return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn)

    async def _engine_loop(self) -> None:
        while True:
            turn = Turn()
            outbox = Outbox()
            self._apply_aborts(outbox)
            self._apply_adds(outbox)
            self._expire(outbox)
            stepped: tuple[float, int] | None = None  # (seconds, batch size), observed once events are sent
            if self.engine.has_unfinished():
                started = turn.mark("prepare")
                batch = len(self.engine.scheduler.running)
                try:
                    if batch:
                        outputs = await self._in_engine_thread(self.engine.step)
                    else:
                        # Nothing running: no stream waits on this loop while the step computes, and the hop
                        # to the engine thread and back (~0.25 ms on the GPU host) would only delay these
                        # requests' first tokens. Jobs, cancels and heartbeats wait one step at most.
                        outputs = self.engine.step()
                    stepped = (turn.mark("step") - started, batch)
                except Exception:
                    log.exception("engine_step_failed")
                    outputs = await self._isolate_failure(outbox)
                for out in outputs:
                    self.book.collect(out, outbox)
                turn.mark("collect")
            if outbox:
                previous = self._publishing
                self._publishing = start_now(self._publish(outbox, after=previous))
                turn.mark("publish")
                if previous is not None and not previous.done():
                    # At most one step's events in flight while the next computes: if Redis stalls, so does
                    # the engine, and nothing piles up.
                    await asyncio.wait({previous})
                elif not EAGER_TASKS:
                    await asyncio.sleep(0)  # let the publish send its command before the next step starts
                turn.mark("publish_wait")
            self.book.announce_started()  # (after the events are on their way: see JobBook.announce_started)
            if stepped is not None:
                self.metrics.step_seconds.observe(stepped[0])
                self.metrics.batch_size.observe(stepped[1])
                turn.mark("rest")
                self.loop_time.add(turn)
            if not self.engine.has_unfinished() and not self._to_add and not self._to_abort:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):  # (deadlines are checked at least this often)
                        await self._wake.wait()

    async def _isolate_failure(self, outbox: Outbox) -> list[RequestOutput]:
        """A step raised. Take every request out of the engine, then put them back one at a time, running a
        step after each: the one whose step raises is the culprit (it ends with an error and goes to the
        dead letters); the others continue from their own tokens, and their clients notice nothing."""
        suspects = [self.requests[rid] for rid in list(self.engine.sequences) if rid in self.requests]
        for req in suspects:
            self.engine.abort_request(req.request_id)
        outputs: list[RequestOutput] = []
        for req in suspects:
            try:
                self._add_to_engine(req)
                outputs.extend(await self._in_engine_thread(self.engine.step))
            except Exception as exc:
                self.engine.abort_request(req.request_id)
                log.error("poison_request", request_id=req.request_id, error=repr(exc))
                self.counts["poisoned"] += 1
                self.book.fail(req, outbox, grpc.StatusCode.INTERNAL, f"the engine failed on this request: {exc}")
                with contextlib.suppress(RedisError, OSError):
                    await self.leases.dead_letter(req.job_bytes, req.entry_id, req.attempt, repr(exc))
        return outputs

    def _add_to_engine(self, req: Running) -> None:
        self.book.start(req, self.engine)

    def _apply_adds(self, outbox: Outbox) -> None:
        adds, self._to_add = self._to_add, []
        for req in adds:
            if req.request_id not in self.requests:
                continue  # cancelled while queued
            try:
                self._add_to_engine(req)
            except ValueError as exc:
                self.book.fail(req, outbox, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _apply_aborts(self, outbox: Outbox) -> None:
        aborts, self._to_abort = self._to_abort, {}
        for rid, reason in aborts.items():
            req = self.requests.get(rid)
            if req is None:
                continue
            outs = self.engine.abort_request(rid)
            if reason == DROP:
                self.book.forget(req)
            elif not outs:  # not in the engine yet
                self.book.finish_unstarted(req, outbox, reason)
            else:
                self.book.end_samples(req, outbox, reason, outs)

    def _expire(self, outbox: Outbox) -> None:
        now_ms = time.time() * 1000
        for rid, req in list(self.requests.items()):
            if req.job.deadline_unix_ms and now_ms > req.job.deadline_unix_ms:
                self._to_abort[rid] = api.STOP_REASON_DEADLINE
        if self._to_abort:
            self._apply_aborts(outbox)

    # -- publishing --------------------------------------------------------------------------------------

    async def _publish(self, outbox: Outbox, after: asyncio.Task | None = None) -> None:
        if after is not None and not after.done():  # (awaiting a finished one would still cost a loop turn)
            await asyncio.gather(after, return_exceptions=True)
        await self._emit(outbox)

    async def _emit(self, outbox: Outbox) -> None:
        """Emit, retrying while Redis is unreachable (the engine waits meanwhile: nothing is dropped)."""
        delay = 0.05
        while True:
            try:
                fenced = await self.emitter.emit(outbox.emissions)
                break
            except (RedisError, OSError) as exc:
                log.warning("emit_failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for emission in fenced:
            # Another worker took this job over while we were not renewing the lease: stop, silently.
            self.counts["fenced_writes"] += 1
            if emission.request_id in self.requests:
                self._to_abort[emission.request_id] = DROP
                self._wake.set()


# Python 3.12+: a task can start at once, up to its first wait, instead of at the loop's next turn.
EAGER_TASKS = sys.version_info >= (3, 12)


def start_now(coro) -> asyncio.Task:
    """A task for `coro` that has already run up to its first wait (3.12+): a publish puts its command on
    the wire before the engine's next step, without a turn of the loop (whose other callbacks would go
    first, on a step's first tokens)."""
    if EAGER_TASKS:
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)
    return asyncio.create_task(coro)


async def _settle(tasks: list[asyncio.Task], what: str, timeout_s: float) -> None:
    """Wait for tasks to end, but never past `timeout_s`: a stopping worker must stop. Whatever is still
    running then is logged with where it waits, and left behind (the process is about to exit)."""
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        where = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()]
        log.error("worker_task_stuck", task=task.get_name(), waiting_for=what, timeout_s=timeout_s, stack=where)
