"""The start-up warm-up (worker/engine/warm_up.py): it takes every kind of step the graphs do not cover, and
leaves the engine as it found it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.test_engine import PROMPTS, make_engine, run_to_completion
from worker.engine import EngineConfig, LLMEngine, SamplingParams
from worker.engine.step_inputs import StepPlan
from worker.engine.warm_up import warm_up

GRAPH_MAX_TOKENS = 32


def requests(engine: LLMEngine) -> list[tuple[str, list[int], SamplingParams]]:
    tok = engine.tokenizer
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.9, top_p=0.95, seed=3)
    return [
        ("greedy", tok.encode(PROMPTS[0]).ids, greedy),
        ("sampled", tok.encode(PROMPTS[1]).ids, sampled),
        # Shares its first blocks with "greedy": a prefix hit, in both engines alike.
        ("again", tok.encode(PROMPTS[0] + "\n    return n").ids, greedy),
    ]


def test_warm_up_leaves_the_engine_as_it_found_it(demo_model_dir: Path) -> None:
    config = {"max_num_batched_tokens": 64, "max_num_seqs": 8, "num_blocks": 256}
    cold, warm = make_engine(demo_model_dir, **config), make_engine(demo_model_dir, **config)
    # On CUDA every engine warms up as it starts; elsewhere only when asked.
    assert (cold.warm_up_report is not None) == (cold.runner.device.type == "cuda")
    report = warm_up(warm)
    assert report.requests == 6 and report.steps > 5
    stats = warm.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.prefix_cache_hit_rate == 0.0 and stats.num_preemptions == 0
    assert warm.step_timing.steps == 0 and not warm.sequences and not warm.forks
    # No cached prefix survives: the first request of each engine computes its whole prompt.
    results = []
    for engine in (cold, warm):
        for request_id, ids, params in requests(engine):
            engine.add_request(request_id, ids, params)
        results.append(run_to_completion(engine)["tokens"])
        assert engine.stats().prefix_cache_hit_rate == cold.stats().prefix_cache_hit_rate
    assert results[0] == results[1]
    assert len(results[0]["greedy"]) == 12


def test_warm_up_and_reset_refuse_a_busy_engine(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir, num_blocks=64)
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
    with pytest.raises(RuntimeError, match="idle"):
        warm_up(engine)
    with pytest.raises(RuntimeError, match="idle"):
        engine.reset()


# Padding rows read an attention output nobody wrote; the interpreter's numpy warns about the garbage there.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_warm_up_takes_the_steps_the_graphs_do_not_cover(demo_model_dir: Path) -> None:
    """With the Triton kernels (the interpreter here) and prefill graphs of up to 32 tokens: the warm-up runs
    an eager step over that size with several prompts, one of them after a cached prefix, and an eager step
    with prompt logprobs beside a decode; the padded (graph) steps run too. Every eager step's block tables
    have a row stride of a multiple of 16, whatever its contexts' lengths, so that Triton compiles one variant
    of each kernel (it specializes integer arguments on divisibility by 16)."""
    engine = LLMEngine(
        EngineConfig(
            model=str(demo_model_dir), attention_backend="triton", max_num_batched_tokens=128,
            max_prefill_tokens_while_decoding=24, max_num_seqs=8, num_blocks=256,
        )
    )  # fmt: skip
    runner = engine.runner
    runner.prefill_graphs = runner.make_prefill_graphs(GRAPH_MAX_TOKENS)  # what the runner captures on CUDA
    steps: list[tuple[StepPlan, int, bool]] = []  # (plan, extra rows, through the graphs' buffers)
    run = runner.run

    def recording_run(plan: StepPlan, extra_rows=(), input_ids: torch.Tensor | None = None) -> torch.Tensor:
        padded = not plan.is_decode and not extra_rows and runner.prefill_graphs.fits(plan)
        steps.append((plan, len(extra_rows), padded))
        return run(plan, extra_rows, input_ids)

    runner.run = recording_run
    strides: list[int] = []  # eager steps' block table row strides: a kernel argument Triton specializes on
    prepare = runner.backend.prepare

    def recording_prepare(plan: StepPlan, device: torch.device):
        meta = prepare(plan, device)
        strides.append(meta.block_tables.stride(0))
        return meta

    runner.backend.prepare = recording_prepare
    report = warm_up(engine)
    assert report.long_prompt_tokens > GRAPH_MAX_TOKENS
    eager_prefills = [p for p, extra, padded in steps if not p.is_decode and not padded and not extra]
    assert any(
        len(p.input_ids) > GRAPH_MAX_TOKENS
        and p.num_seqs >= 2
        and any(c > q for c, q in zip(p.context_lens, p.query_lens, strict=True))
        for p in eager_prefills
    ), "an eager step over the graphs' largest size, one of its prompts after a cached prefix"
    assert any(extra and 1 in p.query_lens for p, extra, _ in steps), "prompt logprobs beside a decode"
    assert any(padded and 1 in p.query_lens for p, _, padded in steps), "a padded mixed step"
    assert any(p.is_decode for p, _, _ in steps)
    # Steps of contexts from 1 to 4 blocks, all with one stride class: one compiled variant per kernel.
    assert strides and all(stride % 16 == 0 for stride in strides), strides


def test_warm_up_keeps_clear_of_the_fault_injection_token(demo_model_dir: Path) -> None:
    """Under fault injection a step whose input holds the poison token raises; the warm-up's prompts never
    hold it (here: the first token its random prompts would draw)."""
    vocab = make_engine(demo_model_dir, num_blocks=64).vocab_size
    poison = random.Random(0).randrange(vocab)
    engine = make_engine(demo_model_dir, num_blocks=256, fault_poison_token_id=poison)
    warm_up(engine)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_warm_up_fits_a_small_context(demo_model_dir: Path) -> None:
    """--max-model-len 24: every warm-up request is cut to fit (none may be refused at start-up)."""
    engine = make_engine(demo_model_dir, num_blocks=64, max_model_len=24)
    report = warm_up(engine)
    assert report.requests == 6 and report.long_prompt_tokens <= 24
