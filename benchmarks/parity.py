"""Greedy parity on the GPU: our engine (bf16, Triton kernels, fused ops, CUDA graphs, batched) against
transformers `generate` (bf16, batch 1, its own attention) on the same weights.

    python -m benchmarks.parity [--shape codellama-7b] [--prompts 16] [--new-tokens 32]

DESIGN.md's anchor: in bf16 the tokens are identical for nearly every sequence; they are not bitwise the
same computation (other kernels, other summation orders), so where two candidate tokens are within
rounding of each other the paths may part. Reports the share of sequences identical over all tokens and,
for the others, where they first differ and the logit gap transformers saw there.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch

from benchmarks.engine_setup import build_model, build_vocab_tokenizer
from worker.engine import EngineConfig, LLMEngine, SamplingParams


def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens, and the gap between its two best logits at each step."""
    out = model.generate(
        torch.tensor([ids], device=model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    top2 = torch.stack([step[0].float().topk(2).values for step in out.logits])
    return out.sequences[0, len(ids) :].tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="codellama-7b")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--stagger", action="store_true", help="one new prompt per engine step instead of all at once")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--prefill-cap", type=int, default=0,
        help="max_prefill_tokens_while_decoding (with --stagger: prompts in chunks beside the decodes)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run transformers in float32: how often do its own bf16 and fp32 agree?",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    control = None
    if args.control:  # the same weights in float32, rounded to bf16 for the model under test
        control = build_model(args.shape, "", device, torch.float32)
        model = copy.deepcopy(control).to(dtype)
    else:
        model = build_model(args.shape, "", device, dtype)
    vocab = model.config.vocab_size
    tokenizer, _ = build_vocab_tokenizer(vocab, "")
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(8, 300))] for _ in range(args.prompts)]
    control_tokens = [greedy(control, ids, args.new_tokens)[0] for ids in prompts] if control is not None else None
    del control

    # transformers first: our engine fuses the q/k/v and gate/up weights in place (as views).
    start = time.perf_counter()
    reference, gaps = [], []
    for ids in prompts:
        tokens, gap = greedy(model, ids, args.new_tokens)
        reference.append(tokens)
        gaps.append(gap)
    hf_s = time.perf_counter() - start

    config = EngineConfig(
        model="(in memory)", dtype=args.dtype, device=args.device, max_prefill_tokens_while_decoding=args.prefill_cap
    )
    engine = LLMEngine(config, tokenizer=tokenizer, model=model)
    # All at once (big prefill steps), or one per step (--stagger: small mixed steps, the CUDA-graphed ones).
    arrivals = [[i] for i in range(len(prompts))] if args.stagger else [list(range(len(prompts)))]
    ours: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished() or arrivals:
        for i in arrivals.pop(0) if arrivals else ():
            engine.add_request(str(i), prompts[i], SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        for output in engine.step():
            ours[output.request_id] += output.new_token_ids

    rows = []
    for i, ref in enumerate(reference):
        got = ours[str(i)]
        first = next((j for j, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), None)
        rows.append({"prompt_len": len(prompts[i]), "identical": first is None, "first_difference": first,
                     "hf_logit_gap_there": gaps[i][first] if first is not None else None})  # fmt: skip
    identical = sum(r["identical"] for r in rows)
    if control_tokens is not None:
        hf_vs_fp32 = sum(a == b for a, b in zip(reference, control_tokens, strict=True))
        ours_vs_fp32 = sum(ours[str(i)] == b for i, b in enumerate(control_tokens))
        print(f"control: transformers {args.dtype} = transformers float32 for {hf_vs_fp32}/{len(prompts)}; "
              f"ours {args.dtype} = transformers float32 for {ours_vs_fp32}/{len(prompts)}")  # fmt: skip
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"shape": args.shape, "dtype": args.dtype, "card": card, "prompts": len(prompts),
              "new_tokens": args.new_tokens, "identical": identical, "rows": rows, "hf_seconds": hf_s}  # fmt: skip
    if control_tokens is not None:
        result["control_hf_identical_to_fp32"] = hf_vs_fp32
        result["control_ours_identical_to_fp32"] = ours_vs_fp32
    for r in rows:
        print(json.dumps(r))
    timing = engine.step_timing
    result |= {"steps": timing.steps, "steps_ahead": timing.steps_ahead, "prefill_cap": args.prefill_cap}
    print(f"greedy parity ({args.dtype}): {identical}/{len(prompts)} sequences identical over {args.new_tokens} tokens "
          f"({timing.steps} steps, {timing.steps_ahead} launched ahead)")  # fmt: skip
    if args.out:
        cap = f"-cap{args.prefill_cap}" if args.prefill_cap else ""
        name = f"{args.dtype}{'-stagger' if args.stagger else ''}{cap}"
        with open(f"{args.out}/parity-{args.shape}-{name}.json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
