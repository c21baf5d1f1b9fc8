"""The bus benchmark's processes: the stand-in worker, the gRPC clients, the Redis probe, the bare grpc.aio
server (the floor) and the gateway under test. Each runs in its own OS process (see bus.py)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.synchronize
import os
import subprocess
import sys
import time
import uuid
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import ResponseError

from codestream.redis_server import free_port
from codestream.stack import stop_child
from protos import api, api_grpc, bus
from protos.keys import JOB_FIELD, Keys

STAMP_DIGITS = 20
PROMPT = "x"  # 2 tokens with BOS: leaves nearly all of the demo model's 2048-token context to max_new_tokens
DEMO_CONTEXT = 2048
TOKEN_ID = 42  # the id every chunk carries (the gateway strips ids unless the client asks for them)
# The worker's first step waits for the phase's streams, but starts without a straggler after this long.
GATHER_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------------------- stand-in worker


@dataclass
class _Stream:
    """A job the stand-in worker is "generating": where its events go and how far it is."""

    job: bus.Job
    entry_id: bytes
    seq: int = 0  # last event seq published

    def event(self, **kind: Any) -> api.GenerateEvent:
        self.seq += 1
        return api.GenerateEvent(request_id=self.job.request_id, seq=self.seq, **kind)


def worker_main(
    redis_url: str,
    namespace: str,
    interval_ms: float,
    batch: int,
    max_batch: int,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    """A worker whose engine step is free: every step gives each active stream one token.

    One round trip per step: the step's PUBLISHes, the XACK + XDEL of finished jobs and a non-blocking
    XREADGROUP for new jobs go in one pipeline (the real worker reads jobs in a task of its own, overlapped
    with the engine's step; here there is no step time to overlap with). Deadlines and cancels are not
    handled: every stream of this benchmark runs to its end.
    """
    r = redis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    worker_id = f"bus-bench-{os.getpid()}"
    try:
        # As worker/service.py: from id 0, so that jobs enqueued before the group existed are served.
        r.xgroup_create(keys.jobs, keys.worker_group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    ready.set()

    active: dict[str, _Stream] = {}

    def take(reply: list | None) -> None:
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                job = bus.Job.FromString(fields[JOB_FIELD])
                active[job.request_id] = _Stream(job, entry_id)

    interval_s = interval_ms / 1000
    next_step = time.perf_counter()
    # The first step waits for the whole batch, as an engine at steady state has it. Without this a worker
    # this fast finishes each stream while the gateway is still opening the next, and every PUBLISH carries
    # one or two events instead of a batch.
    started = False
    last_arrival = time.monotonic()
    while not stop.is_set():
        gathering = not started and len(active) < batch and time.monotonic() - last_arrival < GATHER_TIMEOUT_S
        if not active or gathering:
            had = len(active)
            take(r.xreadgroup(keys.worker_group, worker_id, {keys.jobs: ">"}, count=max_batch - had, block=100))
            if len(active) > had:
                last_arrival = time.monotonic()
            next_step = time.perf_counter()
            continue
        started = True
        if interval_s:
            next_step += interval_s
            time.sleep(max(0.0, next_step - time.perf_counter()))
        batches: dict[str, list[api.GenerateEvent]] = defaultdict(list)
        done: list[bytes] = []
        # Taken before the step's events are built: microseconds before the PUBLISH at low load; under
        # load the build (~µs per event) counts as part of the hop.
        stamp = f"{time.time_ns():0{STAMP_DIGITS}d}"  # fixed width: merged chunks concatenate their stamps
        for rid, s in list(active.items()):
            events = batches[s.job.reply_channel]
            events.append(s.event(tokens=api.TokenChunk(token_ids=[TOKEN_ID], text=stamp)))
            if s.seq == s.job.params.max_new_tokens:
                events.append(s.event(finished=_finished(s.job)))
                done.append(s.entry_id)
                del active[rid]
        pipe = r.pipeline(transaction=False)
        for channel, events in batches.items():
            pipe.publish(channel, bus.EventBatch(worker_id=worker_id, events=events).SerializeToString())
        if done:
            # As the real worker: a job is acknowledged only once its final event is out.
            pipe.xack(keys.jobs, keys.worker_group, *done)
            pipe.xdel(keys.jobs, *done)
        room = max_batch - len(active)
        if room > 0:
            pipe.xreadgroup(keys.worker_group, worker_id, {keys.jobs: ">"}, count=room)
        replies = pipe.execute()
        if room > 0:
            take(replies[-1])
    r.close()


def _finished(job: bus.Job) -> api.Finished:
    return api.Finished(
        stop_reason=api.STOP_REASON_LENGTH,
        prompt_tokens=len(job.prompt_token_ids),
        generated_tokens=job.params.max_new_tokens,
        seed=job.params.seed,
        timings=api.Timings(total_ms=max(0.0, time.time() * 1000 - job.accepted_unix_ms)),
    )


# ------------------------------------------------------------------------------------------------ clients


class StreamError(Exception):
    """The stream broke the contract: no Queued first, a seq gap, a wrong count, no Finished."""


@dataclass
class ClientResult:
    streams_ok: int = 0
    errors: list[str] = field(default_factory=list)
    error_after_s: list[float] = field(default_factory=list)  # when each failed stream ended, from the start
    token_events: int = 0
    token_messages: int = 0  # gRPC messages that carried them (the gateway merges chunks for a slow reader)
    first_token_ns: int = 0  # time.time_ns() of the first token event this process received
    last_token_ns: int = 0
    done_ns: int = 0  # when the last of this process's streams ended
    cpu_s: float = 0.0  # this process, all threads, from the start signal to the end
    latencies_ms: bytes = b""  # array("d"): receive - publish, one per token event
    open_ms: bytes = b""  # array("d"): call -> Queued event, one per stream (how long the gateway took to accept)


def client_main(
    target: str,
    streams: int,
    tokens: int,
    timeout_s: float,
    ready: multiprocessing.Queue,
    go: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue,
) -> None:
    results.put(asyncio.run(_client(target, streams, tokens, timeout_s, ready, go)))


async def _client(
    target: str,
    streams: int,
    tokens: int,
    timeout_s: float,
    ready: multiprocessing.Queue,
    go: multiprocessing.synchronize.Event,
) -> ClientResult:
    """`streams` concurrent GenerateStream calls over one channel (one HTTP/2 connection), as one process
    of a backend service would make them."""
    result = ClientResult()
    latencies, open_ms = array("d"), array("d")
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = api_grpc.CodeStreamStub(channel)
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)  # all client processes start together
        cpu0, start = time.process_time(), time.monotonic()

        async def checked() -> None:
            try:
                await _one_stream(stub, tokens, timeout_s, latencies, open_ms, result)
            except grpc.aio.AioRpcError as exc:
                result.errors.append(f"{exc.code().name}: {exc.details()}")
                result.error_after_s.append(round(time.monotonic() - start, 3))
            except StreamError as exc:
                result.errors.append(f"StreamError: {exc}")
                result.error_after_s.append(round(time.monotonic() - start, 3))
            else:
                result.streams_ok += 1

        await asyncio.gather(*(checked() for _ in range(streams)))
        result.done_ns = time.time_ns()
        result.cpu_s = time.process_time() - cpu0
    result.latencies_ms = latencies.tobytes()
    result.open_ms = open_ms.tobytes()
    return result


async def _one_stream(
    stub: api_grpc.CodeStreamStub,
    tokens: int,
    timeout_s: float,
    latencies: array,
    open_ms: array,
    result: ClientResult,
) -> None:
    request = api.GenerateRequest(prompt=PROMPT, stopping=api.StoppingCriteria(max_new_tokens=tokens))
    called = time.monotonic()
    expected_seq = 0
    finished: api.Finished | None = None
    async for event in stub.GenerateStream(request, timeout=timeout_s):
        received_ns = time.time_ns()
        kind = event.WhichOneof("event")
        if finished is not None:
            raise StreamError(f"{kind} event after Finished")
        first_seq = event.first_seq or event.seq  # a merged chunk covers first_seq..seq
        if first_seq != expected_seq or event.seq < first_seq:
            raise StreamError(f"seqs {first_seq}..{event.seq}, expected {expected_seq}")
        if expected_seq == 0:
            if kind != "queued":
                raise StreamError(f"first event is {kind}, not queued")
            open_ms.append((time.monotonic() - called) * 1000)
        elif kind == "tokens":
            text = event.tokens.text
            stamps = [int(text[i : i + STAMP_DIGITS]) for i in range(0, len(text), STAMP_DIGITS)]
            if len(stamps) != event.seq - first_seq + 1:
                raise StreamError(f"chunk {first_seq}..{event.seq} holds {len(stamps)} steps' text")
            latencies.extend((received_ns - stamp) / 1e6 for stamp in stamps)
            result.token_events += len(stamps)
            result.token_messages += 1
            result.first_token_ns = result.first_token_ns or received_ns
            result.last_token_ns = received_ns
        elif kind == "finished":
            finished = event.finished
        else:
            raise StreamError(f"unexpected {kind} event at seq {event.seq}")
        expected_seq = event.seq + 1
    if finished is None:
        raise StreamError("the stream ended without Finished")
    if expected_seq != tokens + 2 or finished.generated_tokens != tokens:
        raise StreamError(f"{expected_seq - 2} token events, Finished says {finished.generated_tokens}, want {tokens}")


# -------------------------------------------------------------------------------------------------- probe


def probe_main(
    redis_url: str,
    namespace: str,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue,
) -> None:
    """Subscribe to every gateway channel of the namespace and time publish -> receive: the Redis hop alone
    (Redis, redis-py, EventBatch parsing), to set against what the clients see through the gateway."""
    r = redis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    pubsub.psubscribe(Keys(namespace).gateway_channel("*"))
    while (confirmation := pubsub.get_message(timeout=1.0)) is None or confirmation["type"] != "psubscribe":
        pass  # Redis confirms the subscription: from here on no message is missed
    ready.set()
    latencies = array("d")
    while not stop.is_set():
        message = pubsub.get_message(timeout=0.1)
        if message is None or message["type"] != "pmessage":
            continue
        batch = bus.EventBatch.FromString(message["data"])
        received_ns = time.time_ns()
        latencies.extend((received_ns - int(e.tokens.text)) / 1e6 for e in batch.events if e.HasField("tokens"))
    pubsub.close()
    r.close()
    results.put(latencies.tobytes())


# ------------------------------------------------------------------------------------ the bare gRPC server

# As gateway/server.py configures its server.
GRPC_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 16 * 2**20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
]


class _FloorServicer(api_grpc.CodeStreamServicer):
    """The least a grpc.aio server does per token event: build it and yield it. The same stream as the
    gateway's (Queued, TokenChunks stamped with their time, Finished), with no Redis, queue or validation:
    what one grpc.aio process can relay at best on this machine."""

    async def GenerateStream(
        self, request: api.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateEvent]:
        rid = uuid.uuid4().hex
        n = request.stopping.max_new_tokens
        yield api.GenerateEvent(request_id=rid, queued=api.Queued(prompt_tokens=2))
        for seq in range(1, n + 1):
            yield api.GenerateEvent(
                request_id=rid, seq=seq, tokens=api.TokenChunk(text=f"{time.time_ns():0{STAMP_DIGITS}d}")
            )
        finished = api.Finished(stop_reason=api.STOP_REASON_LENGTH, prompt_tokens=2, generated_tokens=n)
        yield api.GenerateEvent(request_id=rid, seq=n + 1, finished=finished)


def floor_server_main(
    port: int, ready: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event
) -> None:
    async def serve() -> None:
        server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        api_grpc.add_CodeStreamServicer_to_server(_FloorServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await asyncio.to_thread(stop.wait)
        await server.stop(1)

    asyncio.run(serve())


# -------------------------------------------------------------------------------------------- the gateway


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    target: str  # host:port


@contextlib.contextmanager
def running_gateway(
    redis_url: str, namespace: str, model_dir: Path, log_path: Path, profile_path: str | None
) -> Iterator[GatewayProcess]:
    """`codestream gateway` in its own process, as deployed, serving on a free port until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "CODESTREAM_REDIS_URL": redis_url,
        "CODESTREAM_NAMESPACE": namespace,
        "CODESTREAM_MODEL": str(model_dir),
        "CODESTREAM_LOG_FORMAT": "json",
    }
    # Under cProfile the gateway still ends cleanly on SIGTERM (run_gateway drains and returns), so the
    # profile gets written. cProfile sees only the event-loop thread, which is where the gateway's Python runs.
    profiler = ["-m", "cProfile", "-o", profile_path] if profile_path else []
    command = [sys.executable, *profiler, "-m", "codestream.cli", "gateway"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--shutdown-grace-s", "2"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(f"127.0.0.1:{port}", process, log_path)
        yield GatewayProcess(process, f"127.0.0.1:{port}")
    finally:
        stop_child(process, timeout_s=30)


def _wait_serving(target: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"the gateway did not report SERVING within {timeout_s} s")
