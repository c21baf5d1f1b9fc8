"""Prefill steps through static, padded buffers (what prefill_graphs.py captures as CUDA graphs on a GPU).

Without a GPU the padded step runs eagerly in Triton's interpreter: the same buffers, padding tokens, spare
attention tiles and padded logits rows as a graph replays, so these tests check that padding changes no
real row's result."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine import EngineConfig, LLMEngine, SamplingParams
from worker.engine.prefill_graphs import PrefillGraphs, token_ladder
from worker.engine.step_inputs import StepPlan

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\nclass Cache:\n    def __init__(self):\n        self._d = {}\n",
    "x = 1",
    "    return self._cache[key]\n" * 12,
]


def test_token_ladder_is_sorted_and_ends_at_the_cap():
    assert token_ladder(1024)[:4] == [16, 32, 64, 96]
    assert token_ladder(1024)[-3:] == [896, 960, 1024]
    assert token_ladder(100) == [16, 32, 64, 96, 100]
    assert token_ladder(16) == [16]
    assert token_ladder(0) == []
    ladder = token_ladder(1024)
    assert ladder == sorted(set(ladder))
    # Padding wastes at most 63 tokens past 512, 31 below.
    assert max(b - a for a, b in itertools.pairwise(ladder)) == 64


class CountingGraphs(PrefillGraphs):
    """Counts the steps it ran and their padded sizes."""

    sizes_run: list[int]

    def run(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.sizes_run.append(self.size_for(plan))
        return super().run(plan, input_ids)


def padded_engine(model_dir: Path, max_tokens: int, **overrides) -> tuple[LLMEngine, CountingGraphs]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), attention_backend="triton", **overrides))
    runner = engine.runner
    graphs = runner.make_prefill_graphs(max_tokens)
    graphs.__class__ = CountingGraphs
    graphs.sizes_run = []
    runner.prefill_graphs = graphs  # what the runner builds and captures on CUDA
    return engine, graphs


# Padding rows read an attention output nobody wrote; the interpreter's numpy warns about the garbage there.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_padded_prefill_gives_the_eager_steps_logits(demo_model_dir: Path) -> None:
    """One prompt, then two prompts and a decode in one step, then a chunk after a cached prefix: the padded
    step's logits equal the eager step's. The attention kernel's grid is fixed, its programs share the tiles."""
    engine, graphs = padded_engine(demo_model_dir, 96, max_num_batched_tokens=96, max_num_seqs=4)
    runner, tok = engine.runner, engine.tokenizer
    bs = runner.block_size
    a, b = tok.encode(PROMPTS[0]).ids, tok.encode(PROMPTS[1]).ids
    blocks_a, blocks_b, blocks_c = [1, 2, 3], [4, 5, 6, 7, 8], [9, 10]

    def slots(table: list[int], start: int, end: int) -> list[int]:
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    one = StepPlan(
        input_ids=a, positions=list(range(len(a))), slots=slots(blocks_a, 0, len(a)),
        query_starts=[0], query_lens=[len(a)], context_lens=[len(a)], block_tables=[blocks_a],
        sample_indices=[len(a) - 1], sampled_seq_indices=[0],
    )  # fmt: skip
    # `a` decodes its next token while `b` and the first half of `a` again (into other blocks) prefill.
    half = len(a) // 2
    mixed = StepPlan(
        input_ids=[7, *b, *a[:half]],
        positions=[len(a), *list(range(len(b))), *list(range(half))],
        slots=slots(blocks_a, len(a), len(a) + 1) + slots(blocks_b, 0, len(b)) + slots(blocks_c, 0, half),
        query_starts=[0, 1, 1 + len(b)], query_lens=[1, len(b), half], context_lens=[len(a) + 1, len(b), half],
        block_tables=[blocks_a, blocks_b, blocks_c],
        # Every sequence's last row, also the chunk's that samples nothing when served: all three are compared.
        sample_indices=[0, len(b), len(b) + half], sampled_seq_indices=[0, 1, 2],
    )  # fmt: skip
    # The rest of that copy of `a`, after the half cached above: attention reads cached keys.
    rest = StepPlan(
        input_ids=a[half:], positions=list(range(half, len(a))), slots=slots(blocks_c, half, len(a)),
        query_starts=[0], query_lens=[len(a) - half], context_lens=[len(a)], block_tables=[blocks_c],
        sample_indices=[len(a) - half - 1], sampled_seq_indices=[0],
    )  # fmt: skip
    for plan in (one, mixed, rest):
        assert graphs.fits(plan)
        runner.prefill_graphs = None
        eager = runner.run(plan).clone()
        runner.prefill_graphs = graphs
        padded = runner.run(plan)
        assert padded.shape == eager.shape
        torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
        if plan is mixed:
            eager_mixed = eager
    assert graphs.sizes_run == [graphs.size_for(p) for p in (one, mixed, rest)]
    assert all(size > len(p.input_ids) for size, p in zip(graphs.sizes_run, (one, mixed, rest), strict=True))
    # A step launched ahead passes its ids on the device (lookahead.py): the plan's own ids are then ignored.
    given = torch.tensor(mixed.input_ids, device=runner.device)
    mixed.input_ids = [0] * len(mixed.input_ids)
    torch.testing.assert_close(runner.run(mixed, input_ids=given), eager_mixed, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (padding rows: see above)
def test_generation_through_padded_prefills_matches_transformers(demo_model_dir: Path) -> None:
    """Chunked prefill, a prompt next to decoding streams, a cached prefix: greedy tokens as transformers'."""
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    engine, graphs = padded_engine(demo_model_dir, 48, max_num_batched_tokens=64, max_num_seqs=4)
    tok = engine.tokenizer
    ids = [tok.encode(p).ids for p in (PROMPTS[0], PROMPTS[3][:150], PROMPTS[2], PROMPTS[0] + " return")]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    engine.add_request("r0", ids[0], params)
    engine.add_request("r1", ids[1], params)
    step = 0
    while engine.has_unfinished() or step < 3:
        if step == 2:  # arrives while r0 decodes: a mixed step; shares r0's prompt prefix
            engine.add_request("r2", ids[2], params)
            engine.add_request("r3", ids[3], params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    for i, prompt in enumerate(ids):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert tokens[f"r{i}"] == want[0, len(prompt) :].tolist(), f"request r{i}"
    assert graphs.sizes_run, "no step went through the padded buffers"
    assert max(graphs.sizes_run) <= 48


def test_steps_that_do_not_fit_run_eagerly(demo_model_dir: Path) -> None:
    engine, graphs = padded_engine(demo_model_dir, 32, max_num_batched_tokens=64, max_num_seqs=4)
    prompt = engine.tokenizer.encode(PROMPTS[3]).ids
    engine.add_request("long", prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    # Chunks of 64 tokens are over the 32-token cap; only a last chunk of 32 or fewer fits.
    last = len(prompt) % 64
    assert graphs.sizes_run == ([graphs.size_for_tokens(last)] if 0 < last <= 32 else [])
    with pytest.raises(ValueError, match="prefill_graph_max_tokens"):
        EngineConfig(model=str(demo_model_dir), prefill_graph_max_tokens=-1)


def run_mix(engine: LLMEngine) -> dict[tuple[str, int], tuple]:
    """Requests of every kind the engine serves, one arriving while others decode; per (request, sample):
    token ids, text, finish reason, rounded logprobs."""
    tok = engine.tokenizer
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=5, ignore_eos=True)
    requests = [
        ("greedy", PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True), 1),
        ("forked", PROMPTS[2], seeded, 2),  # n = 2: the second sample forks from the prefill's logits
        ("logprobs", PROMPTS[1][:40], SamplingParams(max_new_tokens=4, logprobs=2, ignore_eos=True), 1),
        ("penalized", PROMPTS[0], SamplingParams(max_new_tokens=5, repetition_penalty=1.3, ignore_eos=True), 1),
    ]
    for request_id, prompt, params, n in requests:
        engine.add_request(request_id, tok.encode(prompt).ids, params, n=n)
    late = ("late", tok.encode(PROMPTS[1]).ids[:20], SamplingParams(max_new_tokens=3, ignore_eos=True))
    seen: dict[tuple[str, int], tuple] = {}
    step = 0
    while engine.has_unfinished() or late:
        if step == 2 and late:
            engine.add_request(*late)
            late = None
        for out in engine.step():
            ids, text, _, lps = seen.get((out.request_id, out.index), ([], "", None, []))
            lps = lps + [round(lp.logprob, 3) for lp in out.logprobs]
            seen[(out.request_id, out.index)] = (ids + out.new_token_ids, text + out.text, out.finish_reason, lps)
        step += 1
    return seen


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="compares logprobs to 3 decimals: on a GPU the two engines run bf16 with matrix products each picks by "
    "timing at start-up; the GPU's check is test_captured_prefill_graphs_change_no_output_on_the_gpu (float32)",
)
def test_padded_prefills_change_no_output_of_any_kind_of_request(demo_model_dir: Path) -> None:
    """Forks, logprobs, penalties, seeded sampling and a late arrival (a mixed step) with and without the
    padded prefill path: the same tokens, texts, endings and logprobs."""
    plain = LLMEngine(
        EngineConfig(model=str(demo_model_dir), attention_backend="triton", max_num_batched_tokens=96, max_num_seqs=8)
    )
    padded, graphs = padded_engine(demo_model_dir, 96, max_num_batched_tokens=96, max_num_seqs=8)
    expected = run_mix(plain)
    assert run_mix(padded) == expected
    assert len(expected) == 6  # five requests, one of them with two samples
    assert graphs.sizes_run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graphs are captured only there")
def test_captured_prefill_graphs_change_no_output_on_the_gpu(demo_model_dir: Path) -> None:
    """The same mix on a GPU, in float32: prefill and mixed steps replayed from captured CUDA graphs against
    the same steps launched eagerly (prefill graphs off)."""
    common = {"model": str(demo_model_dir), "device": "cuda", "dtype": "float32"}
    common |= {"max_num_batched_tokens": 96, "max_num_seqs": 8}
    eager = LLMEngine(EngineConfig(**common, prefill_graph_max_tokens=0))
    graphed = LLMEngine(EngineConfig(**common))
    graphs = graphed.runner.prefill_graphs
    assert graphs is not None and graphed.runner.graph_stats["prefill"]["graphs"] > 0
    graphs.__class__ = CountingGraphs
    graphs.sizes_run = []
    expected = run_mix(eager)
    assert run_mix(graphed) == expected
    assert len(expected) == 6 and graphs.sizes_run  # (the graphs did run the prefills)
