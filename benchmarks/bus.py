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
import contextlib
import datetime
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.synchronize
import queue
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.bus_actors import (
    DEMO_CONTEXT,
    ClientResult,
    GatewayProcess,
    client_main,
    floor_server_main,
    probe_main,
    running_gateway,
    worker_main,
)
from benchmarks.bus_report import BacklogWatch, CpuMeter, machine, percentiles, print_profile, print_report, value_span
from codestream.demo_model import ensure_demo_model
from codestream.redis_server import EmbeddedRedis, free_port
from protos.keys import Keys

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
            worker = spawn(worker_main, *worker_args, worker_ready, stop)
            if phase.interval_ms:  # at low load, also time the Redis hop alone
                probe_ready = ctx.Event()
                probe = spawn(probe_main, setup.redis_url, setup.namespace, probe_ready, stop, probe_results)
                if not probe_ready.wait(30):
                    raise RuntimeError("the Redis probe did not subscribe")
            if not worker_ready.wait(30):
                raise RuntimeError("the stand-in worker did not start")
            pids = {"gateway": setup.gateway.process.pid, "worker": worker.pid}
        else:
            port, server_ready = free_port(), ctx.Event()
            target = f"127.0.0.1:{port}"
            server = spawn(floor_server_main, port, server_ready, stop)
            if not server_ready.wait(30):
                raise RuntimeError("the bare gRPC server did not start")
            pids = {"grpc_server": server.pid}

        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        clients = [
            spawn(client_main, target, n, phase.tokens, setup.timeout_s, ready, go, results)
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
        "errors_after_s": value_span([t for res in client_results for t in res.error_after_s]),
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


if __name__ == "__main__":
    sys.exit(main())
