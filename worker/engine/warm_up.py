"""Every kind of step once at start-up, so that no kernel compiles while the engine serves.

Why: Triton compiles a kernel the first time a process launches it with a new specialization. CUDA graph
capture at start-up compiles what the graphs replay, but not the eager variants: steps over the prefill
graphs' largest size (a burst of prompts, a long prompt with nothing else running), and steps that return
prompt logprobs (extra logits rows), with or without decodes beside them. On a machine whose Triton cache
is cold (a fresh pod) each such compile took 0.6-1.6 s on an H100, and every running stream waited for it:
a burst of 256 prompts (W1) as a fresh engine's first work compiled 3 kernels in 3.2 s, and ran at 3,170
tok/s against 3,815 with every kernel compiled before (run 81, `python -m benchmarks.jit_compiles`). With
this warm-up, and eager block tables of one width class (attention_backends.py), nothing compiles while
serving (run 82).

How: a handful of requests through the engine's own add/step, so that the warm-up takes the same paths as
real traffic rather than an imitation of them; then the engine's bookkeeping is rebuilt (engine.reset), so
that no cached prefix, count or timing of the warm-up is left behind.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from worker.engine.engine import LLMEngine

# Prompt lengths: Triton specializes integer arguments on being 1 or a multiple of 16, so both kinds.
DECODING_PROMPT = 13
LOGPROBS_PROMPT = 37
SAMPLED_PROMPT = 16
# Every sampling control at once: the sampler's masked and penalized paths (torch, but its first calls
# allocate and load kernels too).
SAMPLED = SamplingParams(
    temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.9, repetition_penalty=1.1,
    presence_penalty=0.5, frequency_penalty=0.5, logit_bias={1: 1.0}, max_new_tokens=3, ignore_eos=True,
    logprobs=2, seed=7,
)  # fmt: skip


@dataclass(frozen=True)
class WarmUpReport:
    requests: int
    steps: int
    seconds: float
    long_prompt_tokens: int  # the eager prefill's prompt (over the prefill graphs' largest size)


def warm_up(engine: LLMEngine) -> WarmUpReport:
    """Run the warm-up requests to the end, then reset the engine's bookkeeping. The engine must be idle."""
    if engine.has_unfinished():
        raise RuntimeError("warm_up needs an idle engine")
    started = time.perf_counter()
    rng = random.Random(0)

    poison = engine.config.fault_poison_token_id  # (fault injection: a step with it raises)

    def prompt(length: int) -> list[int]:
        # (Within a small --max-model-len too: the requests below ask for up to 8 new tokens.)
        length = max(1, min(length, engine.max_model_len - 8))
        ids = (rng.randrange(engine.vocab_size) for _ in range(length))
        return [(t + 1) % engine.vocab_size if t == poison else t for t in ids]

    def greedy(new_tokens: int, **kw) -> SamplingParams:
        return SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **kw)

    steps = 0

    def drain() -> None:
        nonlocal steps
        while engine.has_unfinished():
            engine.step()
            steps += 1

    # A stream that decodes while the others arrive, so that their prompt tokens share steps with a decode.
    engine.add_request("warm-up-decoding", prompt(DECODING_PROMPT), greedy(8))
    engine.step()
    steps += 1
    # Prompt logprobs: an eager step with extra logits rows, beside the decode.
    engine.add_request("warm-up-logprobs", prompt(LOGPROBS_PROMPT), greedy(2, logprobs=2, prompt_logprobs=True))
    engine.add_request("warm-up-sampled", prompt(SAMPLED_PROMPT), SAMPLED, n=2)
    long_prompt = prompt(_long_prompt_tokens(engine))
    engine.add_request("warm-up-long", long_prompt, greedy(2))
    drain()
    # Then, with nothing decoding: a fresh long prompt (an eager step when it exceeds the prefill graphs'
    # largest size, as a burst of prompts does) beside the first long prompt again with 3 more tokens (a
    # prefix-cache hit, whose prefill attends to cached context).
    engine.add_request("warm-up-alone", prompt(len(long_prompt)), greedy(2))
    engine.add_request("warm-up-prefix", long_prompt + prompt(3), greedy(2))
    drain()
    engine.reset()
    return WarmUpReport(
        requests=6, steps=steps, seconds=time.perf_counter() - started, long_prompt_tokens=len(long_prompt)
    )


def _long_prompt_tokens(engine: LLMEngine) -> int:
    """Over the prefill graphs' largest size (an eager step), within what one request may hold."""
    graphs = engine.runner.prefill_graphs
    wanted = (graphs.max_tokens if graphs is not None else engine.config.block_size) + 17
    # Two such prompts run at once, with room for the prefix request's 3 more tokens and 2 new ones each.
    room = min(engine.max_model_len, engine.kv_capacity_tokens // 3) - 8
    return max(1, min(wanted, room - 3))
