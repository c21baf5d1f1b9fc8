"""Where the inter-token latency tail comes from: the engine alone in a closed loop, every step traced.

    python -m benchmarks.step_trace --shape codellama-7b                        # the GPU run
    python -m benchmarks.step_trace --shape codellama-7b --caps 384,256 --repeats 2
    python -m benchmarks.step_trace --shape tiny --quick                        # CPU smoke run

The engine runs with the worker's own settings (as the serving benchmark's engine phase), `--concurrency`
streams at a time (the serving sweep's c=32 by default: prompts uniform in [128, 1024], 256 new tokens, a
new request added as soon as one finishes). For each step it records what it held (prompt tokens, decode
rows), how it went out (read first, launched ahead, launched early), its GPU time (CUDA events around the
forward pass) and the GPU's idle time before it; for each stream, the gaps between its tokens as the
caller of step() sees them. It prints the gaps' median / p90 / p99 and, for the gaps at or above the p99,
which kind of step ended them: that is what the stack's ITL tail at c=32 is made of, before gRPC and Redis.

`--caps` repeats the loop at each value of max_prefill_tokens_while_decoding (the scheduler's attribute,
set between runs on one engine), interleaved `--repeats` times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving import env_name, sweep_options, worker_settings, write_standin
from codestream.bench import load_prompts
from codestream.bench_report import percentiles
from worker.engine import LLMEngine, SamplingParams


@dataclass
class StepRecord:
    prompt_tokens: int  # tokens of prompt chunks in the step
    decode_rows: int
    how: str  # "first" (read before the next launch), "ahead", "early"
    returned: float = 0.0  # perf_counter when step() returned it
    gpu_ms: float = 0.0
    idle_before_ms: float = 0.0  # GPU idle between the previous step's end and this one's start
    events: tuple | None = None

    @property
    def kind(self) -> str:
        return "mixed" if self.prompt_tokens and self.decode_rows else "prompt" if self.prompt_tokens else "decode"


class Tracer:
    """Wraps the runner's run() (CUDA events around each forward) and the engine's _read (how each step went
    out). Steps are read in launch order, so the n-th read is the n-th launch."""

    def __init__(self, engine: LLMEngine) -> None:
        self.launched: list[StepRecord] = []
        self.read: list[StepRecord] = []
        cuda = torch.cuda.is_available()
        run, read = engine.runner.run, engine._read

        def traced_run(plan, *args, **kwargs):
            lens = plan.query_lens
            record = StepRecord(sum(n for n in lens if n > 1), sum(n == 1 for n in lens), "first")
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            out = run(plan, *args, **kwargs)
            if cuda:
                end.record()
                record.events = (start, end)
            self.launched.append(record)
            return out

        def traced_read(step):
            record = self.launched[len(self.read)]
            record.how = "early" if step.early else "ahead" if step.ahead else "first"
            self.read.append(record)
            return read(step)

        engine.runner.run, engine._read = traced_run, traced_read

    def finish(self) -> None:
        """GPU times, once every event has completed."""
        if not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        previous = None
        for record in self.launched:
            if record.events is None:
                continue
            start, end = record.events
            record.gpu_ms = start.elapsed_time(end)
            record.idle_before_ms = previous.elapsed_time(start) if previous is not None else 0.0
            previous = end
            record.events = None


def closed_loop(engine: LLMEngine, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict[str, Any]:
    """`concurrency` streams; each finished request is followed at once by the next prompt."""
    tracer = Tracer(engine)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    queue = list(enumerate(prompts))
    last_token: dict[str, float] = {}
    added: dict[str, float] = {}
    ttfts: list[float] = []
    gaps: list[tuple[float, int]] = []  # (gap ms, index of the step that ended it)

    def add_next() -> None:
        i, prompt = queue.pop(0)
        added[f"c-{i}"] = time.perf_counter()
        engine.add_request(f"c-{i}", prompt, params)

    for _ in range(min(concurrency, len(queue))):
        add_next()
    start = time.perf_counter()
    tokens = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        index = len(tracer.read) - 1
        if index >= 0:
            tracer.read[index].returned = now
        for out in outputs:
            if not out.new_token_ids:
                continue
            tokens += len(out.new_token_ids)
            if out.request_id in last_token:
                gaps.append(((now - last_token[out.request_id]) * 1e3, index))
            else:
                ttfts.append(now - added[out.request_id])
            last_token[out.request_id] = now
            if out.finished and queue:
                add_next()
    wall = time.perf_counter() - start
    del engine.runner.run, engine._read  # the class's own methods again
    tracer.finish()
    return summarize(tracer.read, gaps, tokens, wall) | {"ttft_ms": percentiles(ttfts)}


def summarize(steps: list[StepRecord], gaps: list[tuple[float, int]], tokens: int, wall: float) -> dict[str, Any]:
    itl = percentiles([g for g, _ in gaps], scale=1.0)
    p99 = itl.get("p99", 0.0)
    tail = Counter(f"{steps[i].kind}/{steps[i].how}" for g, i in gaps if g >= p99 - 1e-3)  # p99 is rounded
    by_kind: dict[str, list[StepRecord]] = defaultdict(list)
    for record in steps:
        by_kind[f"{record.kind}/{record.how}"].append(record)
    kinds = {
        key: {
            "steps": len(records),
            "gpu_ms": percentiles([r.gpu_ms for r in records], scale=1.0),
            "idle_before_ms": percentiles([r.idle_before_ms for r in records], scale=1.0),
            "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in records),
            "decode_rows_mean": statistics.fmean(r.decode_rows for r in records),
        }
        for key, records in sorted(by_kind.items())
    }
    return {
        "tokens_per_s": tokens / wall,
        "steps": len(steps),
        "itl_ms": itl,
        "tail_steps": dict(tail),
        "kinds": kinds,
        "gpu_busy": sum(r.gpu_ms for r in steps) / (wall * 1e3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", default="codellama-7b", choices=("codellama-7b", "tiny"))
    add("--concurrency", type=int, default=32)
    add("--rounds", type=int, default=4, help="requests = concurrency x rounds")
    add("--caps", default="", help="max_prefill_tokens_while_decoding values to compare (default: the worker's)")
    add("--repeats", type=int, default=1)
    add("--worker-set", action="append", default=[], help="worker setting KEY=VALUE")
    add("--work", default="/tmp/codestream-serving")
    add("--out", default="", help="write the results as JSON here")
    add("--quick", action="store_true")
    args = parser.parse_args(argv)

    from codestream import settings
    from worker.config import WorkerConfig
    from worker.main import engine_config

    model_dir = write_standin(args.shape, Path(args.work) / f"model-{args.shape}")
    env = {env_name(k): v for k, v in worker_settings(args).items()}
    config = settings.load(WorkerConfig, env=env)
    engine = LLMEngine(engine_config(config, str(model_dir)))
    options = sweep_options(args, args.concurrency)
    count = args.concurrency * args.rounds
    caps = [int(c) for c in args.caps.split(",")] if args.caps else [engine.scheduler.max_prefill_tokens_while_decoding]
    warm = load_prompts(options, engine.vocab_size, args.concurrency, seed=1)
    engine.scheduler.max_prefill_tokens_while_decoding = caps[0]
    closed_loop(engine, [list(p.token_ids) for p in warm], args.concurrency, 16)  # compiles, graph warm-up
    results = []
    for repeat in range(args.repeats):
        for i, cap in enumerate(caps):
            engine.scheduler.max_prefill_tokens_while_decoding = cap
            # Fresh prompts every run: one run's prompts would hit the prefix cache in the next.
            prompts = load_prompts(options, engine.vocab_size, count, seed=1000 + repeat * len(caps) + i)
            result = closed_loop(engine, [list(p.token_ids) for p in prompts], args.concurrency, options.output_len)
            result |= {"cap": cap, "repeat": repeat, "concurrency": args.concurrency}
            results.append(result)
            print_result(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def print_result(r: dict[str, Any]) -> None:
    itl = r["itl_ms"]
    print(
        f"c={r['concurrency']} cap={r['cap']} #{r['repeat']}: {r['tokens_per_s']:,.1f} tok/s, {r['steps']} steps, "
        f"GPU busy {r['gpu_busy']:.1%}; ITL median {itl['median']:.2f} p90 {itl['p90']:.2f} p99 {itl['p99']:.2f} ms "
        f"(ratio {itl['p99'] / itl['median']:.2f}); TTFT median {r['ttft_ms']['median']:.1f} p90 "
        f"{r['ttft_ms']['p90']:.1f} ms; gaps >= p99 ended by {r['tail_steps']}",
        flush=True,
    )
    for key, k in r["kinds"].items():
        print(
            f"    {key:14s} {k['steps']:5d} steps, prompt {k['prompt_tokens_mean']:6.1f} tok, decode rows "
            f"{k['decode_rows_mean']:5.1f}; GPU ms median {k['gpu_ms']['median']:.2f} p90 {k['gpu_ms']['p90']:.2f} "
            f"max {k['gpu_ms']['max']:.2f}; idle before median {k['idle_before_ms']['median']:.2f} "
            f"p90 {k['idle_before_ms']['p90']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
