"""Reading a request's event log (written by workers, see worker/emitter.py): entry ids are `<seq>-0`, so
the events after a given seq are one XRANGE, and following a live request is a blocking XREAD."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from protos import api
from protos.keys import EVENT_FIELD, Keys


def _events(entries: list) -> list[api.GenerateEvent]:
    return [api.GenerateEvent.FromString(fields[EVENT_FIELD]) for _entry_id, fields in entries]


async def read_range(redis: Redis, keys: Keys, request_id: str, first_seq: int, last_seq: int | None = None):
    """Logged events with first_seq <= seq (<= last_seq), in order."""
    end = f"{last_seq}-0" if last_seq is not None else "+"
    return _events(await redis.xrange(keys.event_log(request_id), f"{first_seq}-0", end))


async def follow(
    redis: Redis, keys: Keys, request_id: str, after_seq: int, deadline: float, block_ms: int = 1000
) -> AsyncIterator[api.GenerateEvent]:
    """Events after `after_seq` as they are logged, until a terminal one or the deadline (time.time())."""
    last = after_seq
    log_key = keys.event_log(request_id)
    while time.time() < deadline:
        block = max(1, min(block_ms, int((deadline - time.time()) * 1000)))
        reply = await redis.xread({log_key: f"{last}-0"}, count=512, block=block)
        for _stream, entries in reply or []:
            for event in _events(entries):
                last = event.seq
                yield event
                if event.HasField("finished") or event.HasField("error"):
                    return
