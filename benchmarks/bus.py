"""Bus benchmark: the token events one gateway process relays per second, and the latency that the
gateway + Redis hop adds. No model runs.

    clients (grpc.aio) ──GenerateStream──▶ gateway (one process) ──XADD Job──▶ Redis ──XREADGROUP──▶ stand-in
          ▲                                   │   ▲                                                  worker
          └────────── GenerateEvent ──────────┘   └───────── PUBLISH EventBatch per step ◀─────────────┘

Every box is its own OS process, as in a deployment (on one host here). The stand-in worker speaks the
real Redis contract (consumer group, XREADGROUP, one PUBLISH per gateway per step carrying one TokenChunk
per active request, seq contiguous from 1, Finished last, then XACK + XDEL) but its "engine" costs
nothing, so what is measured is the gateway. Three phases, one gateway:

* throughput: --streams streams of --tokens tokens; the worker runs steps back-to-back, as fast as
  Redis takes them, far ahead of the gateway (the backlog waits in the gateway's per-request inboxes).
  Figure: token events the clients receive per second, first to last, all clients.
* grpc-floor: the same clients against a bare grpc.aio server that only builds and yields the same
  events (no Redis, no gateway logic): what any grpc.aio process can relay on this machine, one message
  per token event. The gateway's figure read against this one says what is gRPC's and what is ours.
* latency: a few streams, one step every --interval-ms. Each TokenChunk's text is the worker's
  time.time_ns() just before the PUBLISH, so the client's receive time minus it is the hop (same host,
  same clock). A probe subscribed to the same channel times the Redis hop alone, for comparison.

Every stream is checked (Queued, seq contiguous, exactly --tokens TokenChunks, Finished, OK status).
The CPU time of each process is read from /proc (Redis: INFO cpu): on a small machine all of them share
the same cores, and events per gateway-CPU-second depends far less on that than events per second.

    python -m benchmarks.bus                 # all three phases, ~25-30 s on 2 cores
    python -m benchmarks.bus --quick         # smoke run, ~7 s (mostly start-up)
    python -m benchmarks.bus --phases throughput --streams 512 --client-procs 2
    python -m benchmarks.bus --phases throughput --gateway-profile /tmp/gateway.prof   # + cProfile top list
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.synchronize
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import ResponseError

from codestream.demo_model import ensure_demo_model
from codestream.redis_server import EmbeddedRedis, free_port
from protos import api, api_grpc, bus
from protos.keys import JOB_FIELD, Keys

RESULTS_DIR = Path(__file__).parent / "results"

# Parameters of a full run and of --quick; a flag given on the command line wins over both.
DEFAULTS: dict[str, Any] = {
    "streams": 256,
    "tokens": 300,
    "client_procs": 1,
    "latency_streams": 8,
    "latency_tokens": 500,
    "interval_ms": 10.0,
}
QUICK: dict[str, Any] = {**DEFAULTS, "streams": 32, "tokens": 100, "latency_streams": 4, "latency_tokens": 50}

STAMP_DIGITS = 20
PROMPT = "x"  # 2 tokens with BOS: leaves nearly all of the demo model's 2048-token context to max_new_tokens
DEMO_CONTEXT = 2048
TOKEN_ID = 42  # the id every chunk carries (the gateway strips ids unless the client asks for them)
# The worker's first step waits for the phase's streams, but starts without a straggler after this long.
GATHER_TIMEOUT_S = 2.0

PHASES = ("throughput", "grpc-floor", "latency")


@dataclass(frozen=True)
class Phase:
    name: str  # one of PHASES
    streams: int
    tokens: int  # per stream
    client_procs: int
    interval_ms: float  # between worker steps; 0: back-to-back

    @property
    def through_gateway(self) -> bool:
        """grpc-floor serves the same clients from a bare grpc.aio server instead: no Redis, no gateway."""
        return self.name != "grpc-floor"


@dataclass(frozen=True)
class Setup:
    """What every phase runs against."""

    ctx: multiprocessing.context.SpawnContext
    redis_url: str
    namespace: str
    gateway: GatewayProcess
    max_batch: int
    timeout_s: float


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = {
        "throughput": Phase("throughput", args.streams, args.tokens, args.client_procs, 0.0),
        "grpc-floor": Phase("grpc-floor", args.streams, args.tokens, args.client_procs, 0.0),
        "latency": Phase("latency", args.latency_streams, args.latency_tokens, 1, args.interval_ms),
    }
    model_dir = ensure_demo_model(with_weights=False)  # tokenizer + config: all that a gateway reads
    namespace = f"busbench{uuid.uuid4().hex[:8]}"  # so that a shared --redis-url is safe to use
    started = datetime.datetime.now(datetime.UTC)
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(EmbeddedRedis()).url
        if args.gateway_log:
            log_path = Path(args.gateway_log)
        else:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bus-bench-"))) / "gateway.log"
        gateway = stack.enter_context(
            running_gateway(redis_url, namespace, model_dir, log_path, args.gateway_profile or None)
        )
        with redis.Redis.from_url(redis_url) as r:
            redis_version = r.info("server")["redis_version"]
        # spawn, not fork: this process uses grpc, whose threads and polling state do not survive a fork.
        setup = Setup(multiprocessing.get_context("spawn"), redis_url, namespace, gateway, args.max_batch, args.timeout)
        results = []
        for name in args.phases:
            phase = phases[name]
            print(f"{phase.name}: {phase.streams} streams x {phase.tokens} tokens ...", flush=True)
            results.append(run_phase(setup, phase))
        with redis.Redis.from_url(redis_url) as r:
            r.delete(Keys(namespace).jobs)  # the jobs stream and its group: leave a shared Redis as found
    report = {
        "benchmark": "bus",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bus", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "redis_version": redis_version,
        "redis": "external" if args.redis_url else "embedded",
        "parameters": {
            k: v for k, v in vars(args).items() if k not in ("out", "gateway_profile", "gateway_log", "redis_url")
        },
        "phases": results,
    }
    print_report(report)
    out = Path(args.out) if args.out else RESULTS_DIR / f"bus-{started:%Y-%m-%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    if args.gateway_profile:
        print_profile(args.gateway_profile)
    failed = any(p["errors"] or p["streams_completed"] != p["streams"] for p in results)
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bus", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--redis-url", default="", help="use this Redis; default: start an embedded one")
    add("--streams", type=int, help=f"throughput, grpc-floor: concurrent streams ({DEFAULTS['streams']})")
    add("--tokens", type=int, help=f"throughput, grpc-floor: tokens per stream ({DEFAULTS['tokens']})")
    add("--client-procs", type=int, help=f"throughput, grpc-floor: client processes ({DEFAULTS['client_procs']})")
    add("--latency-streams", type=int, help=f"latency phase: concurrent streams ({DEFAULTS['latency_streams']})")
    add("--latency-tokens", type=int, help=f"latency phase: tokens per stream ({DEFAULTS['latency_tokens']})")
    add("--interval-ms", type=float, help=f"latency phase: time between steps ({DEFAULTS['interval_ms']})")
    add("--max-batch", type=int, default=256, help="most streams in one worker step, as max_num_seqs (256)")
    add("--phases", default=",".join(PHASES), help=f"comma-separated, run in this order ({','.join(PHASES)})")
    add("--quick", action="store_true", help="a short smoke run")
    add("--timeout", type=float, default=120.0, help="deadline of each stream, seconds (120)")
    add("--out", default="", help="JSON results file (default: benchmarks/results/bus-<date>.json)")
    add("--gateway-profile", default="", help="run the gateway under cProfile and write its stats here")
    add("--gateway-log", default="", help="keep the gateway's log (JSON lines) in this file")
    args = parser.parse_args(argv)
    args.phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: a comma-separated list of {', '.join(PHASES)}")
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("tokens", "latency_tokens"):
        if not 1 <= getattr(args, name) <= DEMO_CONTEXT - 2:
            # The gateway checks prompt + max_new_tokens against the model's context: more streams, not longer.
            parser.error(f"--{name.replace('_', '-')}: must be in [1, {DEMO_CONTEXT - 2}] (the demo model's context)")
    return args


# --------------------------------------------------------------------------------------------- one phase


def run_phase(setup: Setup, phase: Phase) -> dict[str, Any]:
    """Start the phase's processes (stand-in worker, and the Redis probe at low load; or the bare gRPC
    server), then the clients; release the clients together and measure until the last stream ends."""
    ctx = setup.ctx
    stop = ctx.Event()
    with contextlib.ExitStack() as stack:
        spawn = _spawner(ctx, stack, stop)
        probe, probe_results = None, ctx.Queue()
        if phase.through_gateway:
            target = setup.gateway.target
            worker_ready = ctx.Event()
            batch = min(phase.streams, setup.max_batch)
            worker_args = (setup.redis_url, setup.namespace, phase.interval_ms, batch, setup.max_batch)
            worker = spawn(_worker_main, *worker_args, worker_ready, stop)
            if phase.interval_ms:  # at low load, also time the Redis hop alone
                probe_ready = ctx.Event()
                probe = spawn(_probe_main, setup.redis_url, setup.namespace, probe_ready, stop, probe_results)
                if not probe_ready.wait(30):
                    raise RuntimeError("the Redis probe did not subscribe")
            if not worker_ready.wait(30):
                raise RuntimeError("the stand-in worker did not start")
            pids = {"gateway": setup.gateway.process.pid, "worker": worker.pid}
        else:
            port, server_ready = free_port(), ctx.Event()
            target = f"127.0.0.1:{port}"
            server = spawn(_floor_server_main, port, server_ready, stop)
            if not server_ready.wait(30):
                raise RuntimeError("the bare gRPC server did not start")
            pids = {"grpc_server": server.pid}

        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        clients = [
            spawn(_client_main, target, n, phase.tokens, setup.timeout_s, ready, go, results)
            for n in _split(phase.streams, phase.client_procs)
        ]
        _collect(ready, clients, len(clients), 60)  # every client connected

        cpu = CpuMeter(setup.redis_url, pids)
        backlog = BacklogWatch(setup.redis_url)
        start_ns = time.time_ns()
        go.set()
        client_results: list[ClientResult] = _collect(results, clients, len(clients), setup.timeout_s + 30)
        cpu.stop()
        backlog.stop()
        stop.set()
        probe_latencies = array("d", _collect(probe_results, [probe], 1, 30)[0]) if probe else None
    return summarize(phase, client_results, start_ns, cpu, backlog, probe_latencies)


def _spawner(
    ctx: multiprocessing.context.SpawnContext, stack: contextlib.ExitStack, stop: multiprocessing.synchronize.Event
) -> Callable[..., multiprocessing.process.BaseProcess]:
    """spawn(target, *args): start a child process that the stack reaps on the way out: after `stop` is set,
    given time to finish, or at once if the phase failed."""

    def spawn(target: Callable[..., None], *args: Any) -> multiprocessing.process.BaseProcess:
        process = ctx.Process(target=target, args=args, name=target.__name__.strip("_"), daemon=True)
        process.start()

        def reap(exc_type: type[BaseException] | None, *_: object) -> None:
            stop.set()
            process.join(timeout=0 if exc_type else 10)
            if process.is_alive():
                process.kill()
                process.join()

        stack.push(reap)
        return process

    return spawn


def _split(total: int, parts: int) -> list[int]:
    """`total` streams over `parts` processes, as evenly as possible, none empty."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def _collect(results: multiprocessing.Queue, procs: list, count: int, timeout_s: float) -> list:
    """`count` items from a queue that `procs` answer on; fails early if one of them dies instead."""
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count - len(out)} of {count} processes did not answer within {timeout_s:.0f} s")
        try:
            out.append(results.get(timeout=0.5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode}") from None
    return out


def summarize(
    phase: Phase,
    client_results: list[ClientResult],
    start_ns: int,
    cpu: CpuMeter,
    backlog: BacklogWatch,
    probe_latencies: array | None,
) -> dict[str, Any]:
    latencies, open_ms = array("d"), array("d")
    for res in client_results:
        latencies.frombytes(res.latencies_ms)
        open_ms.frombytes(res.open_ms)
    token_events = sum(res.token_events for res in client_results)
    token_messages = sum(res.token_messages for res in client_results)
    got = [res for res in client_results if res.token_events]
    window_s = (max(r.last_token_ns for r in got) - min(r.first_token_ns for r in got)) / 1e9 if got else 0.0
    wall_s = (max(res.done_ns for res in client_results) - start_ns) / 1e9
    cpu_s = cpu.seconds | {"clients": round(sum(res.cpu_s for res in client_results), 3)}
    server_cpu_s = cpu_s[cpu.server]
    errors = [e for res in client_results for e in res.errors]
    out: dict[str, Any] = {
        **asdict(phase),
        "server": cpu.server,  # the process the clients stream from
        "streams_completed": sum(res.streams_ok for res in client_results),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "errors_after_s": _span([t for res in client_results for t in res.error_after_s]),
        "token_events": token_events,
        # gRPC messages that carried them: fewer than events when the gateway merged chunks for slow readers.
        "token_messages": token_messages,
        # From the first token event any client received to the last: the relay rate, without the
        # opening of the streams.
        "window_s": round(window_s, 3),
        "events_per_s": round(token_events / window_s) if window_s else 0,
        # From the start signal to the last stream's end, opening included.
        "wall_s": round(wall_s, 3),
        "events_per_s_wall": round(token_events / wall_s) if wall_s else 0,
        # Worker publish -> client receive. In the throughput phase this is mostly time queued behind the
        # backlog (the worker runs far ahead of the gateway), not the hop.
        "latency_ms": percentiles(latencies),
        # Call -> Queued: validation, tokenization and XADD, and before them the wait for the server to take
        # the call at all (gRPC cancels a call that no handler takes within 30 s).
        "open_ms": percentiles(open_ms),
        "cpu_s": cpu_s,
        "server_threads_cpu_s": cpu.server_threads,
        "events_per_server_cpu_s": round(token_events / server_cpu_s) if server_cpu_s else 0,
        # Most bytes Redis held queued for any subscriber (its pubsub output-buffer limit is 32 MB hard,
        # 8 MB for 60 s by default; past that it drops the gateway's subscription).
        "max_pubsub_backlog_bytes": backlog.max_bytes,
    }
    if probe_latencies is not None:
        out["redis_only_latency_ms"] = percentiles(probe_latencies)
    return out


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


def _worker_main(
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


def _client_main(
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


def _probe_main(
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


def _floor_server_main(
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
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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


# ------------------------------------------------------------------------------------------- measurements


class CpuMeter:
    """CPU seconds of the given processes and of Redis between construction and stop(), and those of the
    server (the first of `pids`) per thread: its main thread runs the event loop, so all of its Python;
    the others are gRPC's."""

    def __init__(self, redis_url: str, pids: dict[str, int]) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.pids = pids
        self.server = next(iter(pids))
        self._before = self._sample()
        self._threads_before = thread_cpu_s(pids[self.server])
        self.seconds: dict[str, float] = {}
        self.server_threads: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        info = self.redis.info("cpu")
        redis_s = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return {name: proc_cpu_s(pid) for name, pid in self.pids.items()} | {"redis": redis_s}

    def stop(self) -> None:
        after = self._sample()
        self.seconds = {k: round(after[k] - self._before[k], 3) for k in after}
        threads = thread_cpu_s(self.pids[self.server])
        deltas = {k: v - self._threads_before.get(k, 0.0) for k, v in threads.items()}
        self.server_threads = {k: round(v, 3) for k, v in sorted(deltas.items(), key=lambda kv: -kv[1]) if v >= 0.01}
        self.redis.close()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads, from /proc/<pid>/stat."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread ("main") and of its other threads by name, summed per name
    (gRPC's C-core names its threads; Python's are all "python")."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            out[name] += _stat_cpu_s((task / "stat").read_text())
    return dict(out)


def _stat_cpu_s(stat: str) -> float:
    # After the ")" that closes the command name, utime and stime are the 12th and 13th fields.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BacklogWatch:
    """Samples, in a thread, how many bytes Redis holds queued for its pub/sub subscribers (the gateway),
    and keeps the most seen: where the backlog sits when the worker runs ahead of the gateway."""

    def __init__(self, redis_url: str, every_s: float = 0.2) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="backlog-watch", daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for client in self.redis.client_list(_type="pubsub"):
                self.max_bytes = max(self.max_bytes, int(client.get("omem", 0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.redis.close()


def _span(values: list[float]) -> list[float]:
    return [min(values), max(values)] if values else []


def percentiles(samples_ms: array) -> dict[str, float]:
    """Nearest-rank percentiles, in ms."""
    if not samples_ms:
        return {}
    s = sorted(samples_ms)

    def at(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))], 3)

    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": round(s[-1], 3), "n": len(s)}


# ------------------------------------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    import google.protobuf
    from google.protobuf.internal import api_implementation

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nbus: one gateway, Redis {report['redis_version']}, {m['cpus']} CPUs ({m['cpu_model']}), no model")
    print(
        f"{'phase':<11}{'streams':>8}{'tokens':>7}{'ok':>6}{'errors':>7}{'events':>9}{'messages':>9}{'events/s':>10}"
        f"{'server CPU s':>14}{'events/CPU-s':>14}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}"
    )
    for p in report["phases"]:
        # Latency under a flood is time queued behind the backlog, not the hop: shown for the latency phase only.
        lat = [f"{p['latency_ms'][k]:>8.2f}" for k in ("p50", "p90", "p99")] if p["interval_ms"] else [f"{'-':>8}"] * 3
        print(
            f"{p['name']:<11}{p['streams']:>8}{p['tokens']:>7}{p['streams_completed']:>6}{p['errors']:>7}"
            f"{p['token_events']:>9}{p['token_messages']:>9}{p['events_per_s']:>10,}{p['cpu_s'][p['server']]:>14.2f}"
            f"{p['events_per_server_cpu_s']:>14,}{''.join(lat)}"
        )
    print("server: the gateway process; for grpc-floor, a bare grpc.aio server (no Redis, no gateway logic)")
    for p in report["phases"]:
        name = p["name"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_s"].items())
        threads = ", ".join(f"{k} {v:.2f}" for k, v in p["server_threads_cpu_s"].items())
        print(f"{name}: {p['window_s']:.1f} s first to last token; CPU s: {cpu} ({p['server']} threads: {threads})")
        if p["open_ms"]:
            o = p["open_ms"]
            print(f"{name}: call -> Queued: p50 {o['p50']:.1f} ms, p90 {o['p90']:.1f}, max {o['max']:.1f}")
        if p["max_pubsub_backlog_bytes"]:
            print(f"{name}: most bytes Redis held for a subscriber: {p['max_pubsub_backlog_bytes']:,}")
        if "redis_only_latency_ms" in p:
            lat = p["redis_only_latency_ms"]
            print(
                f"{name}: Redis hop alone (probe): p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f}, p99 {lat['p99']:.2f}"
            )
        if p["errors"]:
            first, last = p["errors_after_s"]
            print(f"{name}: {p['errors']} streams failed, {first:.1f} to {last:.1f} s after the start:")
        for e in p["error_samples"]:
            print(f"{name}: error: {e}")


def print_profile(path: str, top: int = 25) -> None:
    import pstats

    print(f"\ngateway profile ({path}), top {top} by own time (gRPC's Cython shows up inside Context.run):")
    pstats.Stats(path).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    sys.exit(main())
