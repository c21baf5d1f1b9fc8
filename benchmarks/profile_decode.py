"""Where a decode step's time goes, on the GPU: host phases of engine.step() and the CUDA kernels.

    python -m benchmarks.profile_decode [--out DIR]

Two steady states on the Code Llama 7B stand-in: one stream (S1's shape) and 128 streams of 512-token
prompts. For each: wall time per step, the host phases (StepTiming), GPU kernel time per step and the
kernels that take it (torch.profiler).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_setup import build_model, build_vocab_tokenizer
from benchmarks.prefill_modes import one_step
from worker.engine import EngineConfig, LLMEngine, SamplingParams
from worker.engine.outputs import StepTiming


def steady_state(engine: LLMEngine, streams: int, prompt: int, warm_steps: int, steps: int) -> dict:
    rng = random.Random(streams)
    vocab = engine.vocab_size
    for i in range(streams):
        ids = [1] + [rng.randrange(3, vocab) for _ in range(prompt - 1)]
        engine.add_request(
            f"p{streams}-{i}", ids, SamplingParams(max_new_tokens=warm_steps + steps + 50, ignore_eos=True)
        )
    for _ in range(warm_steps):
        engine.step()
    torch.cuda.synchronize()
    engine.step_timing = StepTiming()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3 / steps  # ms per step
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:14]
    for rid in list(engine.sequences):
        engine.abort_request(rid)
    timing = {k: v / steps * 1e3 if k.endswith("_s") else v for k, v in dataclasses.asdict(engine.step_timing).items()}
    return {
        "streams": streams, "prompt": prompt, "wall_ms_per_step": wall * 1e3, "gpu_kernel_ms_per_step": gpu_total,
        "host_phases_ms_per_step": timing,
        "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                         "calls_per_step": e.count / steps} for e in top],
    }  # fmt: skip


def launch_gap(engine: LLMEngine, prompt: int = 128, steps: int = 100) -> dict:
    """One stream, no profiler: how much of a decode step's wall time the GPU is not busy, and which host
    work makes up that gap (the decode graph's replay call, the input copies, everything else)."""
    graphs = engine.runner.graphs
    plans = []
    run = graphs.run
    graphs.run = lambda plan, ids=None: plans.append(plan) or run(plan, ids)  # keep the plans it replays
    params = SamplingParams(max_new_tokens=steps + 60, ignore_eos=True)
    engine.add_request("gap", [1, *range(3, prompt + 2)], params)
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_ms = (time.perf_counter() - start) / steps * 1e3
    graphs.run = run
    plan = plans[-1]
    graph, _ = graphs.graphs[1]

    def ms(fn, n=50) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(50):
        graph.replay()
    b.record()
    b.synchronize()
    gpu_ms = a.elapsed_time(b) / 50  # back to back: GPU time of one replay

    def replay_host() -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - t0)

    times: list[float] = []
    ms(replay_host)
    replay_call_ms = sum(times) / len(times) * 1e3
    result = {
        "step_wall_ms": step_ms,
        "graph_gpu_ms": gpu_ms,
        "replay_then_sync_ms": ms(lambda: (graph.replay(), torch.cuda.synchronize())),
        "replay_call_host_ms": replay_call_ms,
        "graphs_run_host_ms": ms(lambda: (graphs.run(plan), torch.cuda.synchronize())) - ms(
            lambda: (graph.replay(), torch.cuda.synchronize())),
    }  # fmt: skip
    engine.abort_request("gap")
    return result


def prefill_host_vs_gpu(engine: LLMEngine, lengths=(32, 128, 256, 512, 1024), runs: int = 12) -> list[dict]:
    """One prompt alone, prefill only (one new token): the host's time to enqueue the step's forward pass
    (StepTiming.launch_s) against the GPU's time for it (the same kind of step queued behind a GPU sleep,
    prefill_modes.one_step). An eager prefill is some 300 launches from Python; when the first figure nears
    the second, the step waits on the host. (Graph against eager: benchmarks.prefill_modes.)"""
    rows = []
    rng = random.Random(5)
    for length in lengths:
        launch, gpu, wall = [], [], []
        for i in range(runs + 2):  # (the first two: warm-up)
            ids = [1] + [rng.randrange(3, engine.vocab_size) for _ in range(length - 1)]
            engine.step_timing = StepTiming()
            wall_ms = one_step(engine, ids, f"prefill-{length}-{i}", queued=False)
            launch_ms = engine.step_timing.launch_s * 1e3
            ids = [1] + [rng.randrange(3, engine.vocab_size) for _ in range(length - 1)]
            gpu_ms = one_step(engine, ids, f"queued-{length}-{i}", queued=True)
            if i >= 2:
                wall.append(wall_ms)
                gpu.append(gpu_ms)
                launch.append(launch_ms)
        rows.append({"prompt": length, "wall_ms": sorted(wall)[runs // 2], "gpu_ms": sorted(gpu)[runs // 2],
                     "launch_host_ms": sorted(launch)[runs // 2]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill host-vs-GPU table")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model("codellama-7b", "", device, torch.bfloat16)
    tokenizer, _ = build_vocab_tokenizer(model.config.vocab_size, "")
    engine = LLMEngine(EngineConfig(model="(in memory)"), tokenizer=tokenizer, model=model)
    prefill = prefill_host_vs_gpu(engine)  # as configured: prefill steps replayed as CUDA graphs
    for row in prefill:
        print(f"prefill {row['prompt']:5d} tokens: wall {row['wall_ms']:.2f} ms, GPU (queued) {row['gpu_ms']:.2f} ms, "
              f"host launching the forward {row['launch_host_ms']:.2f} ms (medians)")  # fmt: skip
    if args.prefill_only:
        if args.out:
            with open(f"{args.out}/profile-prefill.json", "w") as f:
                json.dump({"card": torch.cuda.get_device_name(), "prefill": prefill}, f, indent=1)
        return
    gap = launch_gap(engine)
    print("1 stream, no profiler (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in gap.items() if v is not None))
    results = [steady_state(engine, 1, 128, 20, 40), steady_state(engine, 128, 512, 40, 20)]
    for r in results:
        phases = json.dumps(r["host_phases_ms_per_step"])
        print(
            f"\n{r['streams']} streams: wall {r['wall_ms_per_step']:.2f} ms/step, "
            f"GPU kernels {r['gpu_kernel_ms_per_step']:.2f} ms/step; host phases {phases}"
        )
        for k in r["top_kernels"]:
            print(f"  {k['ms_per_step']:7.3f} ms  x{k['calls_per_step']:5.0f}  {k['name']}")
    if args.out:
        with open(f"{args.out}/profile-decode.json", "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "prefill": prefill, "launch_gap": gap, "results": results},
                      f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
