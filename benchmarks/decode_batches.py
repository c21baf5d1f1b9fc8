"""Decode steps at 2-32 sequences on the Code Llama 7B stand-in: wall time per step, with the engine's
settings as given (GPU). For an A/B of an engine setting, run it once per value, interleaved:

    python -m benchmarks.decode_batches --engine triton_skinny=true
    python -m benchmarks.decode_batches --engine triton_skinny=false

Each batch: that many streams of 128-token prompts decode together (CUDA graphs, as the worker runs them);
after 20 warm-up steps, 100 steps are timed (median of 5 runs of 20). The engine keeps at most 32
sequences (its graphs: 1, 2, 4, 8, 16, 24, 32) and prefills eagerly: start-up is short, and decode is what is
measured.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from benchmarks.engine import engine_overrides, synchronize
from benchmarks.engine_setup import build_model, build_vocab_tokenizer
from worker.engine import EngineConfig, LLMEngine, SamplingParams

BATCHES = (2, 4, 8, 16, 24, 32)


def ms_per_step(engine: LLMEngine, streams: int, prompt: int = 128, warm: int = 20, runs: int = 5) -> float:
    rng = random.Random(streams)
    for i in range(streams):
        ids = [1] + [rng.randrange(3, engine.vocab_size) for _ in range(prompt - 1)]
        params = SamplingParams(max_new_tokens=warm + runs * 20 + 50, ignore_eos=True)
        engine.add_request(f"b{streams}-{i}", ids, params)
    while any(seq.num_generated_tokens == 0 for seq in engine.sequences.values()):  # every prompt prefilled
        engine.step()
    for _ in range(warm):
        engine.step()
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        for _ in range(20):
            engine.step()
        synchronize()
        times.append((time.perf_counter() - start) / 20 * 1e3)
    for rid in {seq.request_id for seq in engine.sequences.values()}:
        engine.abort_request(rid)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="append", default=[], help="engine setting KEY=VALUE")
    parser.add_argument("--shape", default="codellama-7b", choices=("codellama-7b", "tiny"), help="tiny: a CPU dry run")
    args = parser.parse_args()
    overrides = engine_overrides(parser, args.engine)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    model = build_model(args.shape, "", device, dtype)
    tokenizer, _ = build_vocab_tokenizer(model.config.vocab_size, "")
    settings = {"max_num_seqs": 32, "prefill_graph_max_tokens": 0, "num_blocks": 1024} | overrides
    engine = LLMEngine(EngineConfig(model="(in memory)", **settings), tokenizer=tokenizer, model=model)
    label = " ".join(args.engine) or "defaults"
    figures = {b: ms_per_step(engine, b) for b in BATCHES}
    print(f"{label:28s} " + "  ".join(f"{b:2d} seqs {ms:6.3f} ms" for b, ms in figures.items()))
    print(f"  product table (ms per pass over a shape's weights): {json.dumps(engine.runner.product_timings)}")


if __name__ == "__main__":
    main()
