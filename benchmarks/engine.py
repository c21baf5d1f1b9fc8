"""Engine benchmark: W1, S1 and T1 (DESIGN.md, "Measuring") on our engine and, in the same process, on the
same card, with the same model object, on transformers `generate` and transformers continuous batching;
every figure also as a percentage of its hardware floor, from ceilings measured in the same run.

    python -m benchmarks.engine --shape codellama-7b                 # the GPU run; random-weight Code Llama 7B
    python -m benchmarks.engine --shape codellama-7b --peers fast    # peers: only eager generate
    python -m benchmarks.engine --model /path/to/CodeLlama-7b-hf     # a real checkpoint
    python -m benchmarks.engine --shape tiny --device cpu --quick    # CPU smoke test, ~30-60 s on 2 cores

Order: ceilings (HBM copy, matmul) -> model -> our engine (start-up, warm-up, S1, T1, W1) -> the engine and
its KV pool freed -> peers, each in its own try (a failing peer shows its error in the table). Progress
lines carry timestamps and the JSON is rewritten after every phase, so a killed run still shows where it
was and what it had measured. The table is printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from benchmarks.engine_floors import floors
from benchmarks.engine_peers import hf_continuous_batching, hf_generate, stream_figures
from benchmarks.engine_report import Report, brief, header, model_record, print_summary, table
from benchmarks.engine_setup import (
    CODELLAMA_7B,
    QUICK,
    TINY_VOCAB,
    ModelFacts,
    Prompts,
    Workloads,
    build_model,
    build_vocab_tokenizer,
    default_results_path,
    describe_device,
    measure_ceilings,
    model_facts,
)
from worker.engine import EngineConfig, LLMEngine, SamplingParams
from worker.engine.model_runner import resolve_device, resolve_dtype
from worker.engine.outputs import StepTiming

WORKLOAD_NAMES = ("w1", "s1", "t1")
_T0 = time.perf_counter()


def log(message: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    print(f"[{now:%H:%M:%S} +{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    w = QUICK if args.quick else Workloads()
    selected = set(args.workloads.split(","))
    started = datetime.datetime.now(datetime.UTC)
    hardware = describe_device(device)
    out = default_results_path(hardware["card"], f"{started:%Y%m%d-%H%M%S}")
    if args.out:  # a file, or a directory (e.g. $OUT on the lent machine) to put the usual name in
        out = Path(args.out) if args.out.endswith(".json") else Path(args.out) / out.name
    report = Report(out, header(args, started, hardware, w, device, dtype))
    log(f"engine benchmark on {hardware['card']} ({device}, {dtype}); results: {out}")

    # The stand-in's tokenizer trains for ~8 s on the CPU: let it do so while the GPU measures and builds.
    vocab = TINY_VOCAB if args.shape == "tiny" else CODELLAMA_7B["vocab_size"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        tokenizer_future = pool.submit(build_vocab_tokenizer, vocab, args.model)
        ceilings = report.data["ceilings"] = measure_ceilings(device, dtype)
        log(
            f"ceilings: HBM copy {ceilings['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s (read + write), matmul "
            f"{ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({ceilings['matmul_n']}³ {ceilings['matmul_dtype']})"
        )
        model, facts = load_model(args, device, dtype, report)
        tokenizer, report.data["tokenizer"] = tokenizer_future.result()
    tok_info = report.data["tokenizer"]
    log(f"tokenizer: {tok_info['vocab_size']} tokens, built in {tok_info['build_s']:.1f} s")
    prompts = Prompts(min(model.config.vocab_size, tokenizer.get_vocab_size()))
    w1_prompts = prompts.w1(w)

    engine_config = EngineConfig(
        model=args.model or f"<random {args.shape}>", device=str(device), dtype=args.dtype, **args.engine
    )
    engine = start_engine(engine_config, model, tokenizer, report)
    kv_capacity = report.data["engine"].get("kv_capacity_tokens")
    fl = report.data["floors"] = floors(
        facts, ceilings, w, [len(p) for p in w1_prompts], kv_capacity, engine_config.max_num_seqs
    )
    w1_floor = f"{fl['w1']['tokens_per_s']:,.0f} tok/s" if fl["w1"] else "n/a (no KV pool size)"
    log(f"floors: S1 TPOT {fl['s1_tpot_s'] * 1e3:.2f} ms, T1 TTFT {fl['t1_ttft_s'] * 1e3:.2f} ms, W1 {w1_floor}")
    report.save()

    if engine is not None:
        run_ours(engine, prompts, w1_prompts, w, selected, args.w1_deadline_s, report)
        del engine  # the peers need the memory of its KV pool (and transformers sizes its own from what is free)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            log(f"engine freed: {torch.cuda.memory_allocated(device) / 1e9:.2f} GB still allocated (the weights)")
    run_peers(model, prompts, w1_prompts, w, selected, args, report)

    report.data["table"] = table(report.data, show_targets=args.shape == "codellama-7b" or bool(args.model))
    report.data["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report.save()
    log(f"results written to {out}")
    print_summary(report.data)
    return 0


def load_model(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, report: Report
) -> tuple[PreTrainedModel, ModelFacts]:
    start = time.perf_counter()
    model = build_model(args.shape, args.model, device, dtype)
    synchronize()
    facts = model_facts(model)
    report.data["model"] = model_record(args, model, facts, time.perf_counter() - start)
    log(
        f"model: {facts.num_params / 1e9:.3f} B params, {facts.weight_bytes / 1e9:.2f} GB, "
        f"built in {report.data['model']['build_s']:.1f} s"
    )
    return model, facts


def start_engine(
    config: EngineConfig, model: PreTrainedModel, tokenizer: Tokenizer, report: Report
) -> LLMEngine | None:
    """Our engine on the shared model; its start-up (KV pool, graph capture) timed on its own."""
    record: dict[str, Any] = {"config": dataclasses.asdict(config)}
    report.data["engine"] = record
    start = time.perf_counter()
    try:
        engine = LLMEngine(config, tokenizer=tokenizer, model=model)
    except Exception as err:
        traceback.print_exc()
        record["error"] = f"{type(err).__name__}: {err}"
        log(f"engine: ERROR {record['error']}")
        return None
    synchronize()
    record["startup_s"] = time.perf_counter() - start
    record["num_blocks"] = engine.block_manager.num_blocks
    record["kv_capacity_tokens"] = engine.block_manager.num_blocks * config.block_size
    # What actually runs, where this engine version says (getattr: internals move, the benchmark must not).
    record["attention_backend"] = getattr(engine.runner, "backend_name", None)
    record["cuda_graphs"] = getattr(engine.runner, "graphs", None) is not None
    record["gemv"] = getattr(engine.runner, "product_timings", None)
    record["graphs"] = getattr(engine.runner, "graph_stats", None)
    if torch.cuda.is_available() and model.device.type == "cuda":
        record["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(model.device)
        record["gpu_memory_free_bytes"] = torch.cuda.mem_get_info(model.device)[0]
    log(
        f"engine: started in {record['startup_s']:.2f} s, KV pool {record['kv_capacity_tokens']:,} tokens, "
        f"attention {record['attention_backend']}, CUDA graphs {record['cuda_graphs']}"
    )
    if record["gemv"]:
        log(f"batch-1 products, ms per pass (Triton gemv vs cuBLAS, per weight shape): {record['gemv']}")
    return engine


# ------------------------------------------------------------------------------------------- our engine


def run_ours(
    engine: LLMEngine,
    prompts: Prompts,
    w1_prompts: list[list[int]],
    w: Workloads,
    selected: set[str],
    w1_deadline_s: float,
    report: Report,
) -> None:
    results: dict[str, Any] = report.data.setdefault("ours", {})

    def warm_up() -> dict[str, Any]:
        # Every kind of step the timed runs take: prefills of the timed prompt lengths, together more than
        # one step's token budget (so one is chunked and runs beside decodes), batched decode, then decode
        # at batch 1. Lengths of 1, multiples of 16 and others, because Triton specializes kernels on integer
        # arguments equal to 1 or divisible by 16. Compilation, autotuning and lazy allocations happen here.
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        lengths = sorted({1, 13, w.s1_prompt, w.t1_prompt, w.w1_prompt_max - 1, w.w1_prompt_min, w.w1_prompt_max})
        for i, length in enumerate(lengths):
            engine.add_request(f"warmup-{i}", prompts.fresh(length), params)
        drain(engine)
        stream(engine, prompts.fresh(w.s1_prompt), 8, "warmup-single")
        return {"prompt_lengths": lengths}

    def measure(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        attempt(report, results, key, fn)
        # A workload that failed half-way must not leave requests behind for the next one.
        for request_id in list(engine.sequences):
            engine.abort_request(request_id)

    measure("warmup", warm_up)
    if "s1" in selected:
        measure("s1", lambda: run_s1(engine, prompts, w))
    if "t1" in selected:
        measure("t1", lambda: run_t1(engine, prompts, w))
    if "w1" in selected:
        measure("w1", lambda: run_w1(engine, w1_prompts, w.w1_new_tokens, w1_deadline_s))


def stream(engine: LLMEngine, prompt: list[int], new_tokens: int, request_id: str) -> tuple[float, list[float], int]:
    """One request alone: (start time, host time of each token, tokens generated)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    times: list[float] = []
    while engine.has_unfinished():
        times.extend(time.perf_counter() for out in engine.step() if out.new_token_ids)
    return start, times, len(times)


def run_s1(engine: LLMEngine, prompts: Prompts, w: Workloads) -> dict[str, Any]:
    """S1's figures, plus the host time per step by phase (engine.StepTiming): what the GPU waits for."""
    engine.step_timing = StepTiming()
    figures = stream_figures(*stream(engine, prompts.fresh(w.s1_prompt), w.s1_new_tokens, "s1"))
    timing = dataclasses.asdict(engine.step_timing)
    steps = max(timing.pop("steps"), 1)
    figures["host_ms_per_step"] = {k.removesuffix("_s"): round(v / steps * 1e3, 4) for k, v in timing.items()
                                   if k.endswith("_s")}  # fmt: skip
    log(f"s1 host time per step, ms (sample includes the wait for the GPU): {figures['host_ms_per_step']}")
    return figures


def run_t1(engine: LLMEngine, prompts: Prompts, w: Workloads) -> dict[str, Any]:
    samples = []
    for i in range(w.t1_runs):
        start, times, _ = stream(engine, prompts.fresh(w.t1_prompt), 1, f"t1-{i}")
        samples.append(times[0] - start)
    return {"ttft_s": statistics.median(samples), "ttft_s_samples": samples}


def run_w1(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, deadline_s: float) -> dict[str, Any]:
    """All requests added at once; output tokens over the time from the first add to the last finish."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    preemptions_before = engine.stats().num_preemptions
    timing_before = dataclasses.asdict(engine.step_timing)
    synchronize()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"w1-{i}", prompt, params)
    add_s = time.perf_counter() - start
    steps = tokens = finished = max_batch = 0
    in_step_s = 0.0
    partial = False
    next_progress = start + 15
    while engine.has_unfinished():
        t = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        in_step_s += now - t
        steps += 1
        tokens += sum(len(out.new_token_ids) for out in outputs)
        finished += sum(out.finished for out in outputs)
        max_batch = max(max_batch, len(outputs))
        if now >= next_progress:
            log(
                f"  w1: {tokens:,} tokens, {finished}/{len(prompts)} finished, "
                f"{tokens / (now - start):,.1f} tok/s so far"
            )
            next_progress = now + 15
        if now - start > deadline_s:
            # Too slow to finish inside the run's budget: report the rate so far, flagged as partial.
            partial = True
            for request_id in list(engine.sequences):
                engine.abort_request(request_id)
            break
    synchronize()
    wall_s = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "finished": finished,
        "output_tokens": tokens,
        "expected_tokens": len(prompts) * new_tokens,
        "partial": partial,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s,
        "steps": steps,
        "mean_batch": tokens / steps if steps else 0.0,  # sequences sampled per step
        "max_batch": max_batch,
        "in_step_s": in_step_s,  # inside engine.step(): schedule, prepare, forward, sample, detokenize
        "outside_step_s": wall_s - in_step_s,  # add_request (add_s of it) and this loop
        "add_s": add_s,
        "preemptions": engine.stats().num_preemptions - preemptions_before,
        # Host time inside the steps by phase, and the steps launched before the previous one was read
        # (lookahead.py): the rest left the GPU idle while the host read them and prepared the next.
        **{
            f"step_{key}": value - timing_before[key]
            for key, value in dataclasses.asdict(engine.step_timing).items()
            if key.endswith("_s") or key in ("steps_ahead", "steps_early")
        },
    }


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ peers


def run_peers(
    model: PreTrainedModel,
    prompts: Prompts,
    w1_prompts: list[list[int]],
    w: Workloads,
    selected: set[str],
    args: argparse.Namespace,
    report: Report,
) -> None:
    results: dict[str, Any] = report.data.setdefault("peers", {})
    if args.peers == "none":
        return
    s1_prompt = prompts.fresh(w.s1_prompt) if "s1" in selected else None
    t1_prompts = [prompts.fresh(w.t1_prompt) for _ in range(w.t1_runs + 1)] if "t1" in selected else []
    attempt(report, results, "hf_generate", lambda: hf_generate(model, s1_prompt, w.s1_new_tokens, t1_prompts, False))
    if args.peers == "fast":
        return
    if not args.skip_compile_peer and s1_prompt is not None:
        log("  (transformers compiles its decode forward on the first call: a minute or two on a GPU)")
        attempt(report, results, "hf_generate_static", lambda: hf_generate(model, s1_prompt, w.s1_new_tokens, [], True))
    if "w1" in selected:
        subset = w1_prompts[: args.w1_requests] if args.w1_requests else w1_prompts
        attempt(
            report, results, "hf_continuous_batching", lambda: hf_continuous_batching(model, subset, w.w1_new_tokens)
        )


def attempt(report: Report, results: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one measurement; an error is recorded (and shown in the table) instead of ending the run."""
    log(f"{key}: running")
    start = time.perf_counter()
    try:
        results[key] = fn() | {"elapsed_s": time.perf_counter() - start}
    except Exception as err:
        traceback.print_exc()
        results[key] = {"error": f"{type(err).__name__}: {err}"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log(f"{key}: {brief(results[key])}")
    report.save()


# ------------------------------------------------------------------------------------------------- args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine",
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--shape", choices=("codellama-7b", "tiny"), default="codellama-7b", help="random-weight stand-in's shape")
    add("--model", default="", help="a Hugging Face checkpoint directory instead of a stand-in")
    add("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    add(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="auto: bf16 on cuda, fp32 on cpu",
    )
    add("--quick", action="store_true", help="tiny versions of the workloads (smoke test)")
    add("--workloads", default=",".join(WORKLOAD_NAMES), help="comma-separated subset of w1,s1,t1")
    add("--peers", choices=("all", "fast", "none"), default="all", help="fast: only eager transformers generate")
    add("--skip-compile-peer", action="store_true", help="skip transformers generate with static cache + compile")
    add("--w1-requests", type=int, default=0, help="peers only: run W1 on its first N requests (default: all)")
    add("--w1-deadline-s", type=float, default=120.0, help="ours: stop W1 after this long, report it as partial")
    add("--engine", action="append", default=[], metavar="KEY=VALUE", help="EngineConfig field (repeatable)")
    add("--out", default="", help="JSON file, or directory for the default name (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOAD_NAMES)
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}")
    args.engine = engine_overrides(parser, args.engine)
    return args


def engine_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    """--engine max_num_seqs=128 --engine kv_cache_memory_fraction=0.8: values parsed as JSON, else strings."""
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "device", "dtype"}
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in names:
            parser.error(f"--engine {pair!r}: expected KEY=VALUE, KEY one of {', '.join(sorted(names))}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


if __name__ == "__main__":
    sys.exit(main())
