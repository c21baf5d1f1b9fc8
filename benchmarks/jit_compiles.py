"""What Triton compiles, and when: at start-up, during a burst of prompts (W1), and during a mix of request
kinds, on a machine whose Triton cache is cold (a fresh pod) and on one whose cache is warm (a restart).

    python -m benchmarks.jit_compiles --out benchmarks/results/<dir>       (GPU)
    python -m benchmarks.jit_compiles --shape tiny --quick                  (CPU: nothing compiles, a dry run)

Each variant runs in a process of its own with the worker's engine settings, its Triton cache in a directory
of its own (TRITON_CACHE_DIR):
- "cold, no warm-up": an empty cache, the engine without its start-up warm-up (worker/engine/warm_up.py);
- "cold, warm-up": an empty cache, the engine as the worker builds it;
- "warm cache, warm-up": the previous variant's cache, a new process (a worker restarted on the same node).
Triton's JIT hooks (triton.knobs.runtime: jit_cache_hook before, jit_post_compile_hook after) time every
kernel the process compiles or loads from the cache, and the phase it happened in. The W1 figures show what
a compile in the middle of serving costs: launch time (the host's part of a step) and tokens per second.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PYTHON = sys.executable
VARIANTS = {  # name: (warm-up, cache of the variant before it)
    "cold, no warm-up": (False, False),
    "cold, warm-up": (True, False),
    "warm cache, warm-up": (True, True),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="codellama-7b", choices=["codellama-7b", "tiny"])
    parser.add_argument("--out", default="", help="directory for jit-compiles-<time>.json")
    parser.add_argument("--quick", action="store_true", help="small workloads (CPU dry run)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # a variant's process: its JSON path
    parser.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    from benchmarks.serving import write_standin

    scratch = Path(tempfile.mkdtemp(prefix="jit-compiles-"))
    model_dir = write_standin(args.shape, scratch / "model")
    results, cache = {}, None
    for name, (warm_up, reuse) in VARIANTS.items():
        cache = cache if reuse else Path(tempfile.mkdtemp(prefix="triton-cache-", dir=scratch))
        path = scratch / "variant.json"
        command = [PYTHON, "-m", "benchmarks.jit_compiles", "--child", str(path), "--model-dir", str(model_dir)]
        command += ["--shape", args.shape] + ["--warm-up"] * warm_up + ["--quick"] * args.quick
        log(f"{name}: Triton cache {cache}")
        subprocess.run(command, check=True, env={**os.environ, "TRITON_CACHE_DIR": str(cache)})
        results[name] = json.loads(path.read_text())
    print_table(results)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"jit-compiles-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        path.write_text(json.dumps({"variants": results}, indent=1) + "\n")
        log(f"wrote {path}")
    return 0


# -- one variant's process ----------------------------------------------------------------------------------


class CompileLog:
    """Every kernel compiled (or loaded from the cache) in this process: (phase, kernel, seconds)."""

    def __init__(self) -> None:
        self.phase = "start-up"
        self.events: list[dict[str, Any]] = []
        self._started: dict[Any, float] = {}
        try:
            from triton import knobs
        except ImportError:  # no Triton (a CPU box without it): nothing can compile
            return
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key, fn, **_: Any) -> bool:
        self._started[(fn.name, str(key))] = time.perf_counter()
        return False  # (True would skip the compile)

    def _after(self, *, key, fn, compile, **_: Any) -> None:
        began = self._started.pop((fn.name, str(key)), None)
        seconds = time.perf_counter() - began if began is not None else float("nan")
        constants = {str(k): str(v) for k, v in compile.get("constants", {}).items()}
        self.events.append({"phase": self.phase, "kernel": fn.name, "seconds": seconds, "constants": constants})

    def summary(self, phase: str) -> dict[str, Any]:
        events = [e for e in self.events if e["phase"] == phase]
        kernels = dict(collections.Counter(e["kernel"] for e in events))
        return {"compiles": len(events), "seconds": sum(e["seconds"] for e in events), "kernels": kernels}


def child(args: argparse.Namespace) -> int:
    compiles = CompileLog()  # before the engine imports anything that compiles
    from benchmarks.engine import run_w1, synchronize
    from benchmarks.serving import workloads
    from codestream import settings
    from codestream.bench import load_prompts
    from worker.config import WorkerConfig
    from worker.engine import LLMEngine
    from worker.main import engine_config

    env = {"CODESTREAM_RANDOM_WEIGHTS": "true"} | ({"CODESTREAM_NUM_BLOCKS": "2048"} if args.shape == "tiny" else {})
    config = dataclasses.replace(engine_config(settings.load(WorkerConfig, env=env), args.model_dir), warm_up=False)
    started = time.perf_counter()
    engine = LLMEngine(config)
    synchronize()
    start_s = time.perf_counter() - started
    result: dict[str, Any] = {"warm_up": args.warm_up, "triton_cache": os.environ.get("TRITON_CACHE_DIR")}
    result["start-up"] = compiles.summary("start-up") | {"wall_s": start_s}
    if args.warm_up:  # as LLMEngine does on CUDA when config.warm_up (off above, to time it on its own)
        from worker.engine.warm_up import warm_up

        compiles.phase = "warm-up"
        report = warm_up(engine)
        synchronize()
        result["warm-up"] = compiles.summary("warm-up") | {"wall_s": report.seconds, "steps": report.steps}
    options = workloads(argparse.Namespace(quick=args.quick))["w1"]
    prompts = [list(p.token_ids) for p in load_prompts(options, engine.vocab_size, options.num_prompts, options.seed)]
    compiles.phase = "w1"
    w1 = run_w1(engine, prompts, options.output_len, deadline_s=240)
    result["w1"] = compiles.summary("w1") | {k: w1[k] for k in ("tokens_per_s", "wall_s", "step_launch_s", "steps")}
    compiles.phase = "mix"
    mix = run_mix(engine, 24 if args.quick else 96, 16 if args.quick else 32)
    result["mix"] = compiles.summary("mix") | mix
    result["events"] = compiles.events
    Path(args.child).write_text(json.dumps(result) + "\n")
    log(f"{'warm-up' if args.warm_up else 'no warm-up'}: " + ", ".join(
        f"{phase} {result[phase]['compiles']} compiles ({result[phase]['seconds']:.2f} s)"
        for phase in ("start-up", "warm-up", "w1", "mix") if phase in result
    ))  # fmt: skip
    return 0


def run_mix(engine, count: int, concurrency: int) -> dict[str, Any]:
    """`count` requests of every kind the API allows, `concurrency` at a time (closed loop): prompts of 1 to
    3,000 tokens (a quarter after a shared 512-token prefix), greedy and sampled, logprobs, prompt logprobs,
    two samples; 8 to 32 new tokens each."""
    from benchmarks.engine import synchronize
    from worker.engine import SamplingParams

    rng = random.Random(11)
    vocab = engine.vocab_size
    longest = min(3000, engine.max_model_len - 40)
    prefix = [rng.randrange(3, vocab) for _ in range(min(512, longest // 2))]
    kinds = [
        {},
        {"temperature": 0.8, "top_p": 0.95, "top_k": 50},
        {"logprobs": 3},
        {"prompt_logprobs": True, "logprobs": 1},
        {"temperature": 0.7, "repetition_penalty": 1.2, "presence_penalty": 0.3},
    ]
    requests = []
    for i in range(count):
        length = rng.choice([1, rng.randint(2, 64), rng.randint(64, 1024), rng.randint(1024, longest)])
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        if i % 4 == 0:
            ids = (prefix + ids)[:longest]
        params = SamplingParams(max_new_tokens=rng.randint(8, 32), ignore_eos=True, seed=i, **kinds[i % len(kinds)])
        requests.append((f"mix-{i}", ids, params, 2 if i % 7 == 3 else 1))
    pending, samples_left, tokens = list(reversed(requests)), {}, 0
    synchronize()
    started = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(samples_left) < concurrency:
            request_id, ids, params, n = pending.pop()
            engine.add_request(request_id, ids, params, n=n)
            samples_left[request_id] = n
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                samples_left[out.request_id] -= 1
                if not samples_left[out.request_id]:
                    del samples_left[out.request_id]
    synchronize()
    wall_s = time.perf_counter() - started
    return {"requests": count, "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print("\nkernels compiled or loaded from the Triton cache (count, seconds) per phase; W1 and the mix as run")
    print(f"{'variant':22s} {'start-up':>16s} {'warm-up':>16s} {'W1':>14s} {'mix':>14s}  W1 tok/s  launch s  mix tok/s")
    for name, r in results.items():
        columns = (("start-up", 16), ("warm-up", 16), ("w1", 14), ("mix", 14))
        cells = [_cell(r.get(phase), width) for phase, width in columns]
        print(
            f"{name:22s} {' '.join(cells)}  "
            f"{r['w1']['tokens_per_s']:8,.1f}  {r['w1']['step_launch_s']:8.2f}  {r['mix']['tokens_per_s']:9,.1f}"
        )
        late = {e["kernel"] for e in r["events"] if e["phase"] in ("w1", "mix")}
        if late:
            print(f"{'':22s} compiled while serving: {', '.join(sorted(late))}")
        if "start-up" in r:
            print(f"{'':22s} start-up {r['start-up']['wall_s']:.1f} s" + (
                f", warm-up {r['warm-up']['wall_s']:.1f} s ({r['warm-up']['steps']} steps)" if "warm-up" in r else ""
            ))  # fmt: skip


def _cell(phase: dict[str, Any] | None, width: int) -> str:
    return (f"{phase['compiles']} ({phase['seconds']:.2f} s)" if phase else "-").rjust(width)


if __name__ == "__main__":
    raise SystemExit(main())
