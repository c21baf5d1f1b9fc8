"""A lone prompt's prefill step, replayed as a CUDA graph against launched eagerly, interleaved run by run.

    python -m benchmarks.prefill_modes [--lengths 128,256,512,1024] [--runs 12] [--out DIR]

On the Code Llama 7B stand-in, for each prompt length and run, the same kind of step (a fresh random
prompt, one new token) goes once through the graph and once eagerly, in alternating order, each timed
three ways:
- wall: engine.step() as served (what time to first token sees);
- queued: the same step launched behind 50 ms of GPU sleep, timed with CUDA events (the GPU's time with
  every kernel already waiting, no launch gaps);
- the SM clock (NVML) right after each step, since a dense burst of kernels may run at a lower clock.
Prints medians per length and mode; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from benchmarks.engine_setup import build_model, build_vocab_tokenizer
from worker.engine import EngineConfig, LLMEngine, SamplingParams


def one_step(engine: LLMEngine, ids: list[int], name: str, queued: bool) -> float:
    """ms: the step's wall time, or with queued=True its GPU time behind a sleep (CUDA events)."""
    engine.add_request(name, ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    if not queued:
        t0 = time.perf_counter()
        engine.step()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    start.record()
    engine.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def sm_clock() -> float:
    try:
        return float(torch.cuda.clock_rate())  # NVML (pynvml)
    except Exception:
        return float("nan")


def measure(engine: LLMEngine, lengths: list[int], runs: int) -> list[dict]:
    graphs = engine.runner.prefill_graphs
    rng = random.Random(11)
    rows = []
    for length in lengths:
        samples: dict[str, dict[str, list[float]]] = {
            m: {"wall": [], "queued": [], "clock": []} for m in ("graph", "eager")
        }
        for i in range(runs + 2):
            order = ("graph", "eager") if i % 2 == 0 else ("eager", "graph")
            for mode in order:
                engine.runner.prefill_graphs = graphs if mode == "graph" else None
                ids = [1] + [rng.randrange(3, engine.vocab_size) for _ in range(length - 1)]
                wall = one_step(engine, ids, f"{mode}-{length}-{i}-w", queued=False)
                clock = sm_clock()
                ids = [1] + [rng.randrange(3, engine.vocab_size) for _ in range(length - 1)]
                queued = one_step(engine, ids, f"{mode}-{length}-{i}-q", queued=True)
                if i >= 2:  # two warm-up runs
                    samples[mode]["wall"].append(wall)
                    samples[mode]["queued"].append(queued)
                    samples[mode]["clock"].append(clock)
        for mode, s in samples.items():
            rows.append({"prompt": length, "mode": mode, **{k: statistics.median(v) for k, v in s.items()}})
    engine.runner.prefill_graphs = graphs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32,128,256,384,512,768,1024")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    model = build_model("codellama-7b", "", torch.device("cuda"), torch.bfloat16)
    tokenizer, _ = build_vocab_tokenizer(model.config.vocab_size, "")
    engine = LLMEngine(EngineConfig(model="(in memory)"), tokenizer=tokenizer, model=model)
    engine.block_manager.enable_prefix_caching = False  # every step computes its whole prompt
    print(f"graphs: {json.dumps(engine.runner.graph_stats)}")
    rows = measure(engine, [int(n) for n in args.lengths.split(",")], args.runs)
    print(f"{'prompt':>6} {'mode':>6} {'wall ms':>8} {'queued ms':>9} {'SM MHz':>7}")
    for r in rows:
        print(f"{r['prompt']:6d} {r['mode']:>6} {r['wall']:8.2f} {r['queued']:9.2f} {r['clock']:7.0f}")
    if args.out:
        with open(f"{args.out}/prefill-modes.json", "w") as f:
            card = torch.cuda.get_device_name()
            json.dump({"card": card, "graphs": engine.runner.graph_stats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
