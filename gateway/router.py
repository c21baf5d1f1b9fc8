"""Event routing: one pub/sub subscription per gateway process, demultiplexed to per-request inboxes.

Workers publish one EventBatch per engine step on this gateway's channel. Subscribing once (rather than
per request) keeps Redis' subscription churn and the gateway's connection count flat however many
streams are open. Events for requests this gateway no longer tracks (a client that left) are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from protos import api, bus

log = structlog.get_logger("gateway.router")


@dataclass
class Inbox:
    """Events of one request, in arrival order. Bounded: a request produces at most max_new_tokens + 2
    events, so the bound is never reached in normal operation; if it were, the stream fails (DATA_LOSS)
    rather than let one request grow the gateway's memory."""

    queue: asyncio.Queue[api.GenerateEvent | None]
    overflowed: bool = False
    # Set when events may have been lost (the subscription broke, or the inbox overflowed).
    broken: bool = False

    def fail(self) -> None:
        """Mark the inbox broken and wake its reader (a None in the queue, if there is room for it)."""
        self.broken = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


class EventRouter:
    def __init__(self, redis: Redis, channel: str, reconnect_delay_s: float = 0.5) -> None:
        self.redis = redis
        self.channel = channel
        self.reconnect_delay_s = reconnect_delay_s
        self.inboxes: dict[str, Inbox] = {}
        self.subscribed = asyncio.Event()
        self.events_routed = 0
        self._task: asyncio.Task | None = None
        # Redis' run id, to tell a restarted server (which may have lost queued jobs) from a dropped connection.
        self.redis_run_id = ""
        self.redis_restarted_at = 0.0  # time.monotonic() of the last restart seen
        self.on_redis_restart: list = []  # callbacks, called after resubscribing to a restarted server

    async def start(self) -> None:
        """Subscribe, and return once the subscription is active (so no early event can be missed)."""
        self._task = asyncio.create_task(self._run(), name="event-router")
        waiter = asyncio.create_task(self.subscribed.wait())
        done, _ = await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # raises what stopped it

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def register(self, request_id: str, max_events: int) -> Inbox:
        inbox = Inbox(asyncio.Queue(maxsize=max_events))
        self.inboxes[request_id] = inbox
        return inbox

    def unregister(self, request_id: str) -> None:
        self.inboxes.pop(request_id, None)

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                run_id = (await self.redis.info("server")).get("run_id", "")
                if self.redis_run_id and run_id != self.redis_run_id:
                    self.redis_restarted_at = time.monotonic()
                    log.warning("redis_restarted", channel=self.channel)
                    for callback in self.on_redis_restart:
                        callback()
                self.redis_run_id = run_id
                self.subscribed.set()
                log.info("subscribed", channel=self.channel)
                while True:
                    # The raw reply, not listen()'s: listen() makes a dict of each message and looks for
                    # handlers: ~25 µs more per message on a development machine, on every first token's way.
                    reply = await pubsub.parse_response(block=True)
                    if reply and reply[0] == b"message":
                        self._dispatch(reply[2])
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("subscription_lost", channel=self.channel, error=str(exc))
                # Events published while we were away are gone: end every stream that was waiting on them.
                for inbox in self.inboxes.values():
                    inbox.fail()
                await asyncio.sleep(self.reconnect_delay_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _dispatch(self, data: bytes) -> None:
        batch = bus.EventBatch.FromString(data)
        for event in batch.events:
            inbox = self.inboxes.get(event.request_id)
            if inbox is None:
                continue
            try:
                inbox.queue.put_nowait(event)
            except asyncio.QueueFull:
                inbox.overflowed = True
                inbox.fail()
            self.events_routed += 1
