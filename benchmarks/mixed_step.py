"""What a mixed step costs the GPU against its parts: a prompt chunk next to running streams.

    python -m benchmarks.mixed_step                     # GPU: Code Llama 7B stand-in
    python -m benchmarks.mixed_step --shape tiny        # CPU smoke run (no GPU times)

At concurrency 32 the serving sweep's tail gaps between tokens are the steps that carry a new prompt's
chunk next to the decodes (benchmarks/step_trace.py): about 17.5 ms of GPU time against 10.4 ms for a
decode step, where a 384-token prompt alone takes about 9 ms. This measures, on one engine, steps of
`--decode-rows` streams at `--context` tokens each with and without a `--chunk`-token prompt beside them,
and the prompt alone: GPU time per step (CUDA events around the forward pass, CUDA graphs as the worker
runs them), then the same steps eagerly under torch.profiler, kernel time by kernel. Lookahead is off, so
every step is read before the next is scheduled and each kind of step can be repeated on its own.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_setup import build_model, build_vocab_tokenizer
from benchmarks.step_trace import Tracer
from worker.engine import EngineConfig, LLMEngine, SamplingParams, prefill_graphs


def scenario(engine: LLMEngine, rows: int, context: int, chunk: int, steps: int, profiled: bool) -> dict[str, Any]:
    """`rows` streams decoding at about `context` tokens; each measured step also carries a fresh `chunk`-token
    prompt (that ends with it: max_new_tokens=1) when chunk > 0."""
    rng = random.Random(rows * 7919 + context + chunk)

    def fresh(n: int) -> list[int]:
        return [1] + [rng.randrange(3, engine.vocab_size) for _ in range(n - 1)]

    long = SamplingParams(max_new_tokens=min(1000, engine.max_model_len - context), ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"d{i}", fresh(context), long)
    while any(seq.num_generated_tokens == 0 for seq in engine.sequences.values()):
        engine.step()
    for _ in range(3):  # warm: the step's graph (or kernels) once before timing
        measured_step(engine, chunk, fresh)
    tracer = Tracer(engine)
    kernels: dict[str, float] = defaultdict(float)
    if profiled:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                measured_step(engine, chunk, fresh)
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.key] += e.self_device_time_total / 1e3 / steps
    else:
        for _ in range(steps):
            measured_step(engine, chunk, fresh)
    del engine.runner.run, engine._read
    tracer.finish()
    for rid in list(engine.sequences):
        engine.abort_request(rid)
    gpu = [r.gpu_ms for r in tracer.read]
    return {
        "rows": rows, "context": context, "chunk": chunk, "steps": len(gpu),
        "gpu_ms": statistics.median(gpu) if gpu else 0.0,
        "kernel_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
    }  # fmt: skip


def measured_step(engine: LLMEngine, chunk: int, fresh) -> None:
    if chunk:
        engine.add_request(f"p{id(object())}", fresh(chunk), SamplingParams(max_new_tokens=1, ignore_eos=True))
    engine.step()


def category(kernel: str) -> str:
    name = kernel.lower()
    if "attention" in name or "attn" in name or "_fwd" in name:
        return "attention"
    if "gemm" in name or "gemv" in name or "skinny" in name or "cutlass" in name or "matmul" in name or "sm90" in name:
        return "matmul"
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", default="codellama-7b", choices=("codellama-7b", "tiny"))
    add("--decode-rows", type=int, default=25)
    add("--context", type=int, default=750)
    add("--chunk", type=int, default=384)
    add("--steps", type=int, default=12)
    add("--spare", default="", help="graph modes with these SPARE_PROGRAMS values (prefill_graphs.py), e.g. 16,48")
    add("--no-eager", action="store_true", help="skip the eager, profiled engine")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    model = build_model(args.shape, "", device, dtype)
    tokenizer, _ = build_vocab_tokenizer(model.config.vocab_size, "")
    r, c, p = args.decode_rows, args.context, args.chunk
    cases = [(r, c, 0), (r, c, p), (0, c, p), (r, 64, 0), (r, 64, p)]
    base = {"max_num_seqs": 64, "num_blocks": 2048 if cuda else 512, "decode_lookahead": False,
            "max_prefill_tokens_while_decoding": 2048}  # fmt: skip
    modes: list[tuple[str, dict, int]] = [("graphs", {}, prefill_graphs.SPARE_PROGRAMS)]
    if args.spare:
        modes = [(f"graphs, {n} spare programs", {}, int(n)) for n in args.spare.split(",")]
    if not args.no_eager:
        modes.append(("eager", {"prefill_graph_max_tokens": 0, "cuda_graphs": False}, 0))
    for mode, settings, spare in modes:
        prefill_graphs.SPARE_PROGRAMS = spare  # read when the graphs are captured
        engine = LLMEngine(EngineConfig(model="(in memory)", **base, **settings), tokenizer=tokenizer, model=model)
        print(f"== {mode}", flush=True)
        for rows, context, chunk in cases:
            result = scenario(engine, rows, context, chunk, args.steps, profiled=mode == "eager" and cuda)
            by_category: dict[str, float] = defaultdict(float)
            for kernel, ms in result["kernel_ms"].items():
                by_category[category(kernel)] += ms
            split = ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_category.items()))
            print(
                f"  {rows:3d} decode rows at {context:4d} + {chunk:4d}-token prompt: GPU {result['gpu_ms']:.2f} ms/step"
                + (f"; kernels {sum(by_category.values()):.2f} ms ({split})" if by_category else ""),
                flush=True,
            )
            for kernel, ms in list(result["kernel_ms"].items())[:6]:
                print(f"      {ms:6.3f} ms  {kernel[:110]}", flush=True)
        del engine  # its KV pool and graphs, before the next engine takes its own
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
