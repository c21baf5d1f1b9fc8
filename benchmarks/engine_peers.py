"""The peers `benchmarks.engine` measures in the same process, on the same card, with the same model object.

* transformers `generate`, batch 1, eager with its dynamic cache: S1 and T1.
* transformers `generate` with `cache_implementation="static"`: on CUDA, generate then compiles the decode
  forward by itself (torch.compile, mode "reduce-overhead", i.e. CUDA graphs); on CPU it does not compile,
  which the result records.
* transformers continuous batching (`model.generate_batch`, transformers >= 5.10; 5.17 on the GPU image has
  it with the same signature): W1. It switches the model to its paged attention while it runs (named
  "paged|sdpa" in some 5.x versions, plain "sdpa" over its paged cache in others); the implementation it
  used is recorded.

EOS never ends a peer's generation (the model's generation_config.eos_token_id is cleared while peers
run), so every peer produces exactly the tokens the workload asks for, as our engine does with ignore_eos.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """A streamer that only notes when each generated token reached the host (generate's first put is the
    prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@contextlib.contextmanager
def eos_disabled(model: PreTrainedModel) -> Iterator[None]:
    """generate() fills an unset eos_token_id from the model's generation_config, so clear it there."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_timed(
    model: PreTrainedModel, prompt: list[int], new_tokens: int, **config: Any
) -> tuple[float, list[float], int]:
    """One batch-1 generate: (start time, per-token host times, tokens generated)."""
    input_ids = torch.tensor([prompt], device=model.device)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **config)
    clock = TokenClock()
    _sync(model.device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen, streamer=clock)
    _sync(model.device)
    return start, clock.times, out.shape[1] - len(prompt)


def stream_figures(start: float, times: list[float], generated: int) -> dict[str, Any]:
    n = len(times)
    return {
        "generated_tokens": generated,
        "ttft_s": times[0] - start,
        "tpot_s": (times[-1] - times[0]) / (n - 1) if n > 1 else None,
        "tokens_per_s": n / (times[-1] - start),
    }


def hf_generate(
    model: PreTrainedModel,
    s1_prompt: list[int] | None,
    s1_new_tokens: int,
    t1_prompts: list[list[int]],
    static_cache: bool,
) -> dict[str, Any]:
    """S1 (TTFT, TPOT, tokens/s) and T1 (median TTFT) through model.generate at batch 1."""
    config: dict[str, Any] = {"cache_implementation": "static"} if static_cache else {}
    result: dict[str, Any] = {"cache_implementation": config.get("cache_implementation", "dynamic")}
    with eos_disabled(model):
        if s1_prompt is not None:
            # A static cache is sized prompt + max_new_tokens and the compiled forward is traced on its first
            # call and its CUDA graphs recorded on the next: warm up twice at S1's exact shapes. Eager only
            # needs its kernels loaded once.
            warmup_start = time.perf_counter()
            for _ in range(2 if static_cache else 1):
                _generate_timed(model, s1_prompt, s1_new_tokens if static_cache else 8, **config)
            result["warmup_s"] = time.perf_counter() - warmup_start
            result["s1"] = stream_figures(*_generate_timed(model, s1_prompt, s1_new_tokens, **config))
        if t1_prompts:
            _generate_timed(model, t1_prompts[0], 1, **config)  # warm-up (and compile) at T1's shape
            ttfts = [_generate_timed(model, p, 1, **config) for p in t1_prompts[1:] or t1_prompts]
            samples = [times[0] - start for start, times, _ in ttfts]
            result["t1"] = {"ttft_s": statistics.median(samples), "ttft_s_samples": samples}
    # get_compiled_call() leaves the compiled forward on the model; generate only compiles where it can.
    result["compiled"] = hasattr(model, "_compiled_call")
    return result


def hf_continuous_batching(model: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """W1 through transformers' own continuous batching: output tokens/s.

    The throughput window runs from the requests' creation (after the manager's start-up and CUDA-graph
    warm-up) to the last request's finish, as transformers records them (time.perf_counter, like ours).
    The whole call, start-up included, is reported too.
    """
    cb_config = None
    if model.device.type == "cpu":
        # Its defaults size the cache from "free memory", which on a CPU host is most of RAM and takes
        # seconds to allocate; a small pool is plenty for the smoke test.
        from transformers.generation import ContinuousBatchingConfig

        cb_config = ContinuousBatchingConfig(num_blocks=256, max_batch_tokens=512)

    # Record the attention implementation generate_batch switches the model to while it runs.
    implementations: list[str] = []
    original_set = model.set_attn_implementation

    def recording_set(implementation: str, *args: Any, **kwargs: Any) -> Any:
        implementations.append(str(implementation))
        return original_set(implementation, *args, **kwargs)

    model.set_attn_implementation = recording_set  # type: ignore[method-assign]
    before = model.config._attn_implementation
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
    try:
        with eos_disabled(model):
            _sync(model.device)
            start = time.perf_counter()
            outputs = model.generate_batch(
                prompts, generation_config=gen, continuous_batching_config=cb_config, progress_bar=False
            )
            _sync(model.device)
            end = time.perf_counter()
    finally:
        del model.set_attn_implementation  # back to the class's method

    results = list(outputs.values())
    generated = sum(len(r.generated_tokens) for r in results)
    errors = [r.error for r in results if getattr(r, "error", None)]
    # transformers' own marks, where this version has them (getattr: a missing one must not cost the run),
    # and only if they lie within the call (same clock); else the whole call.
    created = [getattr(r, "created_time", None) for r in results]
    finished = [(getattr(r, "lifespan", None) or (None, None))[1] for r in results]
    marks = [*created, *finished]
    windowed = bool(results) and all(isinstance(t, float) and start <= t <= end for t in marks)
    window_s = max(finished) - min(created) if windowed else end - start
    return {
        "requests": len(prompts),
        "completed": len(results),
        "generated_tokens": generated,
        "expected_tokens": len(prompts) * new_tokens,
        "errors": errors[:5],
        "tokens_per_s": generated / window_s,
        "window_s": window_s,
        "window": "request creation to last finish" if windowed else "whole generate_batch call",
        "call_s": end - start,
        "tokens_per_s_whole_call": generated / (end - start),
        "attn_implementation": implementations[0] if implementations else before,
        "attn_implementation_before": before,
    }
