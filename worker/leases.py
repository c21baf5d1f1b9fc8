"""Who runs which job: leases on the jobs stream's pending entries, reclaim from dead workers, dead letters.

A job a worker took (XREADGROUP) stays in the consumer group's pending list under that worker's name until
it is acknowledged. The pending entry's idle time is the lease: a live worker resets it every heartbeat
(XCLAIM to itself, JUSTID, which leaves the delivery counter alone), so however long a generation runs it
is never taken away; a worker that stops heartbeating (killed, paused, partitioned) lets its entries go
idle, and after `lease_s` another worker takes them over with XAUTOCLAIM, which counts one more delivery.
The delivery count is the attempt number that fences the old worker's writes (see emitter.py); a job
delivered more than `max_deliveries` times goes to the dead-letter stream instead of running again.

A job whose entry is gone from Redis altogether (restarted without persistence) has no lease anyone could
take over: the worker running it goes on with it, unleased ("orphaned"), until it finishes or a new
entry for the same request (the gateway enqueues unstarted jobs again) is delivered to it and becomes
its lease.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from protos.keys import JOB_FIELD, Keys


@dataclass
class Held:
    """A job this worker runs, as renew() needs it."""

    entry_id: bytes
    request_id: str
    attempt: int


@dataclass
class Renewal:
    lost: set[bytes] = field(default_factory=set)  # another worker runs them now: stop
    orphaned: set[bytes] = field(default_factory=set)  # gone from Redis, and no one else runs them: go on


@dataclass
class Claimed:
    entry_id: bytes
    job_bytes: bytes
    deliveries: int


class Leases:
    def __init__(self, redis: Redis, keys: Keys, worker_id: str, lease_s: float, max_deliveries: int) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.lease_ms = int(lease_s * 1000)
        self.max_deliveries = max_deliveries

    async def renew(self, held: list[Held]) -> Renewal:
        """Reset the idle time of the entries this worker still owns, and sort out those it does not."""
        if not held:
            return Renewal()
        owned = await self._owned()
        mine = [h.entry_id for h in held if h.entry_id in owned]
        if mine:
            await self.redis.xclaim(self.keys.jobs, self.keys.worker_group, self.worker_id, 0, mine, justid=True)
        others = [h for h in held if h.entry_id not in owned]
        if not others:
            return Renewal()
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in others:
                pipe.xrange(self.keys.jobs, h.entry_id, h.entry_id, count=1)
                pipe.hget(self.keys.attempt(h.request_id), "attempt")
            replies = await pipe.execute()
        renewal = Renewal()
        for h, entry, attempt in zip(others, replies[::2], replies[1::2], strict=True):
            # An entry still there and not ours is another worker's (reclaimed while this one was not
            # heartbeating), or will be. An entry gone with a newer attempt on record: another worker took
            # the job over and finished it. Either way the job is no longer this worker's to run.
            if entry or int(attempt or 0) > h.attempt:
                renewal.lost.add(h.entry_id)
            else:  # Redis lost the entry (and the job's state with it): no one else can run it.
                renewal.orphaned.add(h.entry_id)
        return renewal

    async def _owned(self) -> set[bytes]:
        try:
            pending = await self.redis.xpending_range(
                self.keys.jobs, self.keys.worker_group, "-", "+", 100_000, consumername=self.worker_id
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis restarted empty and the intake has not made the group again yet (it waits while the
            # worker is full): nothing is pending under anyone.
            return set()
        return {p["message_id"] for p in pending}

    async def reclaim(self, count: int) -> list[Claimed]:
        """Take over up to `count` jobs whose owner stopped renewing its lease."""
        if count <= 0:
            return []
        reply = await self.redis.xautoclaim(
            self.keys.jobs, self.keys.worker_group, self.worker_id, self.lease_ms, "0-0", count=count
        )
        entries = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(self.keys.jobs, self.keys.worker_group, entry_id, entry_id, 1)
            pending = await pipe.execute()
        claimed = []
        for (entry_id, fields), info in zip(entries, pending, strict=True):
            deliveries = info[0]["times_delivered"] if info else 1
            claimed.append(Claimed(entry_id, fields[JOB_FIELD], deliveries))
        return claimed

    async def hand_back(self, entry_ids: list[bytes]) -> None:
        """Leave these jobs to other workers now (drain, or the engine failed on them): mark them idle for
        longer than the lease, so the next reclaim round anywhere takes them."""
        if entry_ids:
            await self.redis.xclaim(
                self.keys.jobs, self.keys.worker_group, self.worker_id, 0, entry_ids,
                idle=self.lease_ms * 10, justid=True,
            )  # fmt: skip

    async def enqueue_again(self, jobs: list[bytes]) -> None:
        """Jobs whose entries Redis lost (it restarted without persistence) and that this worker will not
        finish: new entries, for another worker to run from their prompts. The same seed gives the same
        tokens; the emitter skips the seqs already logged, and the gateway those its client already has."""
        if jobs:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.xadd(self.keys.jobs, {JOB_FIELD: job})
                await pipe.execute()

    async def release(self, entry_ids: list[bytes]) -> None:
        """Acknowledge and delete entries that will not run under them: jobs this worker runs under other
        entries, and entries that will never run (unparseable, or read long past their deadlines)."""
        if entry_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.keys.jobs, self.keys.worker_group, *entry_ids)
                pipe.xdel(self.keys.jobs, *entry_ids)
                await pipe.execute()

    async def dead_letter(self, job_bytes: bytes, entry_id: bytes, deliveries: int, reason: str) -> None:
        await self.redis.xadd(
            self.keys.dead_letters,
            {JOB_FIELD: job_bytes, b"reason": reason, b"deliveries": deliveries, b"worker": self.worker_id,
             b"time": str(time.time())},
            maxlen=10_000, approximate=True,
        )  # fmt: skip
