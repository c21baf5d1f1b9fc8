"""Who runs which job: leases on the jobs stream's pending entries, reclaim from dead workers, dead letters.

A job a worker took (XREADGROUP) stays in the consumer group's pending list under that worker's name until
it is acknowledged. The pending entry's idle time is the lease: a live worker resets it every heartbeat
(XCLAIM to itself, JUSTID, which leaves the delivery counter alone), so however long a generation runs it
is never taken away; a worker that stops heartbeating (killed, paused, partitioned) lets its entries go
idle, and after `lease_s` another worker takes them over with XAUTOCLAIM, which counts one more delivery.
The delivery count is the attempt number that fences the old worker's writes (see emitter.py); a job
delivered more than `max_deliveries` times goes to the dead-letter stream instead of running again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from protos.keys import JOB_FIELD, Keys


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

    async def renew(self, entry_ids: list[bytes]) -> set[bytes]:
        """Reset the idle time of the entries this worker still owns; returns those it no longer owns (another
        worker reclaimed them while this one was not heartbeating: it must stop working on them)."""
        if not entry_ids:
            return set()
        owned = await self._owned()
        mine = [e for e in entry_ids if e in owned]
        if mine:
            await self.redis.xclaim(self.keys.jobs, self.keys.worker_group, self.worker_id, 0, mine, justid=True)
        return set(entry_ids) - owned

    async def _owned(self) -> set[bytes]:
        pending = await self.redis.xpending_range(
            self.keys.jobs, self.keys.worker_group, "-", "+", 100_000, consumername=self.worker_id
        )
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

    async def dead_letter(self, job_bytes: bytes, entry_id: bytes, deliveries: int, reason: str) -> None:
        await self.redis.xadd(
            self.keys.dead_letters,
            {JOB_FIELD: job_bytes, b"reason": reason, b"deliveries": deliveries, b"worker": self.worker_id,
             b"time": str(time.time())},
            maxlen=10_000, approximate=True,
        )  # fmt: skip
