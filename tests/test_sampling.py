"""The sampling set against Hugging Face's logits processors, penalties against their formula, seeded draws
independent of the batch, logprobs (generated and prompt) against the model's log-softmax, and the engine's
stop rules (stop token ids, min_new_tokens, EOS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from worker.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams
from worker.engine.sampler import Sampler

VOCAB = 300
EOS = 2

# One batch, a different combination of controls on every row.
ROWS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3, logit_bias=((5, 4.0), (7, -100.0))),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, typical_p=0.7),
    SamplingParams(
        temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, typical_p=0.9, repetition_penalty=1.2,
        logit_bias={11: 2.5, 12: -3.0}, min_new_tokens=10, stop_token_ids=(13, 14), max_new_tokens=20,
    ),
    SamplingParams(temperature=1.1, repetition_penalty=0.8, top_p=0.95),
    SamplingParams(min_new_tokens=5, stop_token_ids=(3,), max_new_tokens=9),  # greedy, EOS masked
    SamplingParams(min_new_tokens=2, stop_token_ids=(3,), max_new_tokens=9),  # minimum reached: nothing masked
    SamplingParams(temperature=0.6, presence_penalty=0.7, frequency_penalty=-0.4, top_p=0.7),
    SamplingParams(temperature=1.0, min_new_tokens=8, ignore_eos=True, stop_token_ids=(4,), max_new_tokens=9),
    SamplingParams(temperature=1.5, top_k=VOCAB + 5, top_p=1.0, typical_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.5, top_k=1, repetition_penalty=1.5, presence_penalty=2.0, frequency_penalty=1.0),
]  # fmt: skip


def make_batch(seed: int = 0) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(ROWS), VOCAB, generator=g) * 1.5
    steps = [int(torch.randint(0, 8, (1,), generator=g)) for _ in ROWS]
    steps[8], steps[9] = 3, 2
    histories = []
    for s in steps:
        prompt = torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        histories.append(prompt + torch.randint(0, 40, (s,), generator=g).tolist())  # repeats on purpose
    return logits, steps, histories


def presence_frequency(scores: torch.Tensor, generated: list[int], p: SamplingParams) -> torch.Tensor:
    """OpenAI's definition: logit - frequency * count - presence * (count > 0), over the generated tokens."""
    counts = (
        torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=scores.shape[-1]).float().to(scores.device)
    )
    return scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def hf_process(logits: torch.Tensor, history: list[int], steps: int, p: SamplingParams) -> torch.Tensor:
    """One row through transformers' processors, in the order GenerationMixin._get_logits_processor uses."""
    input_ids = torch.tensor([history], device=logits.device)
    scores = logits[None].clone()
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})(input_ids, scores)
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, scores)
    if p.presence_penalty or p.frequency_penalty:
        scores = presence_frequency(scores, history[len(history) - steps :], p)
    if p.min_new_tokens:
        ends = [*p.stop_token_ids] + ([] if p.ignore_eos else [EOS])
        minimum = MinNewTokensLengthLogitsProcessor(len(history) - steps, p.min_new_tokens, ends, logits.device)
        scores = minimum(input_ids, scores)
    if not p.greedy:
        warpers = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
        warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
        warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else []
        warpers += [MinPLogitsWarper(p.min_p)]  # appended whenever min_p is set; 0 changes nothing
        warpers += [TypicalLogitsWarper(p.typical_p)] if p.typical_p < 1.0 else []
        for warper in warpers:
            scores = warper(input_ids, scores)
    return scores[0]


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), f"{what}: different -inf masks"
    finite = ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6), what


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_control_processes_logits_as_hugging_face_does(seed: int) -> None:
    logits, steps, histories = make_batch(seed)
    sampler = Sampler(torch.device("cpu"), eos_token_id=EOS)
    ours = sampler.process(logits, ROWS, steps, histories)
    for r, p in enumerate(ROWS):
        theirs = hf_process(logits[r], histories[r], steps[r], p)
        assert_same_logits(ours[r], theirs, f"row {r}: {p}")
        alone = sampler.process(logits[r : r + 1], [p], [steps[r]], [histories[r]])
        assert torch.equal(alone[0], ours[r]), f"row {r} depends on its batch companions"
    masked = torch.isinf(ours)
    assert masked[2].sum() == VOCAB - 20 and masked[13].sum() == VOCAB - 1  # top_k=20, top_k=1
    assert masked[8, [3, EOS]].all() and not masked[9].any() and not masked[12].any()
    assert masked[11, 4] and not masked[11, EOS]  # ignore_eos: EOS is an ordinary token, not masked
    assert torch.equal(ours[0], logits[0]) and torch.equal(ours[12], logits[12] / 1.5)  # controls off: untouched
    # Greedy rows take the argmax of the processed logits.
    tokens = sampler(logits, ROWS, steps, histories).token_ids
    for r in (0, 1, 8, 9):
        assert tokens[r] == int(ours[r].argmax())
    assert tokens[1] == int(hf_process(logits[1], histories[1], steps[1], ROWS[1]).argmax())


def test_presence_and_frequency_penalties_follow_their_formula() -> None:
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    prompt = [5, 6, 7, 7]  # the prompt does not count
    generated = [[9, 9, 9, 10], [], [6, 11, 6]]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=2.0, frequency_penalty=2.0),
        SamplingParams(temperature=1.0, presence_penalty=-1.0, frequency_penalty=0.5),
    ]
    ours = sampler._process(logits, params, [len(g) for g in generated], [prompt + g for g in generated])
    for r, p in enumerate(params):
        expected = logits[r].clone()
        for token in set(generated[r]):
            expected[token] -= p.presence_penalty + p.frequency_penalty * generated[r].count(token)
        assert torch.allclose(ours[r], expected, atol=1e-6), f"row {r}"
        assert torch.allclose(ours[r], presence_frequency(logits[r], generated[r], p), atol=1e-6)
    assert torch.equal(ours[1], logits[1])  # nothing generated yet: no penalty


def test_penalties_without_histories_are_refused() -> None:
    with pytest.raises(ValueError, match="histories"):
        Sampler(torch.device("cpu"))(torch.zeros(1, 8), [SamplingParams(repetition_penalty=1.1)], [0])


def test_seeded_draws_do_not_depend_on_batch_companions_with_every_control_on() -> None:
    sampler = Sampler(torch.device("cpu"), eos_token_id=EOS)
    target = SamplingParams(
        temperature=0.9, top_k=60, top_p=0.95, min_p=0.02, typical_p=0.95, repetition_penalty=1.2,
        presence_penalty=0.3, frequency_penalty=0.2, logit_bias={20: 1.5}, min_new_tokens=3,
        stop_token_ids=(21,), seed=77, max_new_tokens=10,
    )  # fmt: skip
    logits, _, _ = make_batch(5)
    history = list(range(30, 45))
    drawn = []
    for companions in (0, 3, len(ROWS) - 1):
        others, other_steps = ROWS[:companions], list(range(companions))
        other_histories = [[1, 2, *range(s)] for s in other_steps]
        tokens = []
        for step in range(6):
            row = logits[step % len(ROWS)]
            batch = torch.cat([logits[:companions], row[None]]) if companions else row[None]
            hist = history + tokens
            out = sampler(batch, [*others, target], [*other_steps, step], [*other_histories, hist])
            tokens.append(out.token_ids[-1])
        drawn.append(tokens)
    assert drawn[0] == drawn[1] == drawn[2]
    assert 21 not in drawn[0][:3] and EOS not in drawn[0][:3]


def test_sampling_params_validate_ranges() -> None:
    for field, value in [
        ("min_p", 1.5), ("typical_p", 0.0), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0), ("logit_bias", ((1, 101.0),)), ("logit_bias", ((-1, 1.0),)),
        ("min_new_tokens", 300), ("stop_token_ids", (-1,)), ("logprobs", -2), ("top_p", float("nan")),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    p = SamplingParams(logit_bias={9: 1, 3: -2.0}, stop_token_ids=[4])
    assert p.logit_bias == ((3, -2.0), (9, 1.0)) and p.stop_token_ids == (4,)
    assert hash(p) == hash(SamplingParams(logit_bias=((3, -2.0), (9, 1.0)), stop_token_ids=(4,)))


def test_token_logprobs_rank_and_top_n_up_to_20() -> None:
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(9))
    logp = logits.log_softmax(-1)
    order = logp.argsort(dim=-1, descending=True)
    chosen = [int(order[0, 0]), int(order[1, 6]), int(order[2, 25]), int(order[3, VOCAB - 1])]
    out = sampler.token_logprobs(logits, chosen, [20, 5, 0, 1])
    for r, lp in enumerate(out):
        assert lp.token_id == chosen[r] and lp.logprob == pytest.approx(logp[r, chosen[r]].item(), abs=1e-6)
        assert lp.rank == [1, 7, 26, VOCAB][r]
        n = [20, 5, 0, 1][r]
        assert [t for t, _ in lp.top] == order[r, :n].tolist()
        assert [v for _, v in lp.top] == pytest.approx(logp[r, order[r, :n]].tolist(), abs=1e-6)


# -- the engine --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(demo_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


def with_extra_logit_rows(engine: LLMEngine) -> LLMEngine:
    """Stand-in for the runner interface prompt logprobs need: run(plan, extra_rows) returns the logits of
    plan.sample_indices followed by those of extra_rows (packed-batch rows), in that order."""
    runner, plain = engine.runner, engine.runner.run

    def run(plan, extra_rows=()):
        if not extra_rows:
            return plain(plan)
        meta = runner.backend.prepare(plan, runner.device)
        rows = torch.tensor([*plan.sample_indices, *extra_rows])
        return runner._forward(torch.tensor(plan.input_ids), torch.tensor(plan.positions), meta, rows)

    runner.run = run
    return engine


def collect(engine: LLMEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_prompt_logprobs_accumulate_over_prefill_chunks(demo_model_dir: Path, hf_model) -> None:
    engine = with_extra_logit_rows(
        LLMEngine(EngineConfig(model=str(demo_model_dir), max_num_batched_tokens=16, max_num_seqs=4,
                               num_blocks=128, enable_prefix_caching=False))
    )  # fmt: skip
    tok = engine.tokenizer
    prompts = {"a": "def fibonacci(n):\n    if n < 2:\n        return n\n", "b": "x = 1", "c": "import os\n"}
    ids = {k: tok.encode(v).ids for k, v in prompts.items()}
    assert len(ids["a"]) > 16  # prefilled over several steps
    engine.add_request(
        "a", ids["a"], SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=3, prompt_logprobs=True)
    )
    engine.add_request("b", ids["b"], SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=True))
    engine.add_request("c", ids["c"], SamplingParams(max_new_tokens=2, ignore_eos=True))
    outs = collect(engine)
    for rid, n_top in (("a", 3), ("b", 0)):
        first, second = outs[rid]
        with torch.no_grad():
            logp = hf_model(torch.tensor([ids[rid]])).logits[0, :-1].float().log_softmax(-1)
        assert len(first.prompt_logprobs) == len(ids[rid]) - 1 and second.prompt_logprobs == []
        for i, lp in enumerate(first.prompt_logprobs):
            target = ids[rid][i + 1]
            assert lp.token_id == target
            assert lp.logprob == pytest.approx(logp[i, target].item(), abs=1e-4)
            assert lp.rank == int((logp[i] > logp[i, target]).sum()) + 1
            assert [t for t, _ in lp.top] == logp[i].topk(n_top).indices.tolist() if n_top else lp.top == []
    assert all(o.prompt_logprobs == [] for o in outs["c"])


def test_stop_token_ids_end_like_eos_and_stay_out_of_the_text(demo_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_blocks=64))
    prompt = engine.tokenizer.encode("def add(a, b):\n").ids
    engine.add_request("free", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    free = [t for o in collect(engine)["free"] for t in o.new_token_ids]
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    engine.add_request("stop", prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(free[k],)))
    outs = collect(engine)["stop"]
    last = outs[-1]
    assert [t for o in outs for t in o.new_token_ids] == free[: k + 1]
    assert last.finish_reason is FinishReason.EOS and last.stop_sequence == ""
    assert (
        "".join(o.text for o in outs)
        == engine.tokenizer.decode(prompt + free[:k])[len(engine.tokenizer.decode(prompt)) :]
    )
    # Before min_new_tokens the stop token can be neither drawn nor end the generation.
    engine.add_request("min", prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(free[0],), min_new_tokens=3))
    tokens = [t for o in collect(engine)["min"] for t in o.new_token_ids]
    assert free[0] not in tokens[:3] and len(tokens) >= 4


@pytest.mark.parametrize(("min_new", "ignore_eos", "expected"), [(0, False, 1), (3, False, 4), (3, True, 6)])
def test_min_new_tokens_holds_eos_back(demo_model_dir: Path, min_new: int, ignore_eos: bool, expected: int) -> None:
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_blocks=64))
    eos = engine.eos_token_id
    params = SamplingParams(max_new_tokens=6, min_new_tokens=min_new, ignore_eos=ignore_eos, logit_bias={eos: 100.0})
    engine.add_request("r", engine.tokenizer.encode("x = 1").ids, params)
    outs = collect(engine)["r"]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == expected
    if ignore_eos:  # an ordinary token: neither masked nor the end
        assert tokens == [eos] * expected
    else:
        assert eos not in tokens[:min_new] and tokens[-1] == eos
    assert outs[-1].finish_reason is (FinishReason.LENGTH if ignore_eos else FinishReason.EOS)


def test_engine_seeded_sampling_with_every_control_ignores_batch_companions(demo_model_dir: Path) -> None:
    target = SamplingParams(
        temperature=0.9, top_k=80, top_p=0.95, min_p=0.01, typical_p=0.97, repetition_penalty=1.15,
        presence_penalty=0.4, frequency_penalty=0.3, logit_bias={100: 3.0, 101: -5.0}, min_new_tokens=4,
        stop_token_ids=(2,), seed=1234, max_new_tokens=16, logprobs=2,
    )  # fmt: skip
    companion_params = [
        SamplingParams(temperature=1.0, seed=5, max_new_tokens=20, ignore_eos=True),
        SamplingParams(repetition_penalty=1.4, max_new_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.7, typical_p=0.5, presence_penalty=1.0, seed=6, max_new_tokens=12),
        SamplingParams(temperature=1.2, min_p=0.2, logit_bias={7: 9.0}, min_new_tokens=5, max_new_tokens=8),
    ]
    results = []
    for companions in (0, len(companion_params)):
        engine = LLMEngine(
            EngineConfig(model=str(demo_model_dir), num_blocks=256, max_num_batched_tokens=32, max_num_seqs=8)
        )
        ids = engine.tokenizer.encode("for i in range(10):\n").ids
        for c in range(companions):
            engine.add_request(f"c{c}", ids[: 2 + 3 * c], companion_params[c])
        engine.add_request("target", ids, target)
        results.append(collect(engine)["target"])
    alone, in_company = results
    assert [o.new_token_ids for o in alone] == [o.new_token_ids for o in in_company]
    assert alone[-1].finish_reason is in_company[-1].finish_reason and len(alone) >= 4
    for a, b in zip(alone, in_company, strict=True):  # the model's logits differ in the last bits with the batch
        assert (a.logprobs[0].token_id, a.logprobs[0].rank) == (b.logprobs[0].token_id, b.logprobs[0].rank)
        assert a.logprobs[0].logprob == pytest.approx(b.logprobs[0].logprob, abs=1e-4)


def test_sampled_logprobs_have_top_n_and_ranks_of_the_models_distribution(demo_model_dir: Path, hf_model) -> None:
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_blocks=64))
    ids = engine.tokenizer.encode("# Sort a list of integers\n").ids
    for rid, n_top in (("five", 5), ("twenty", 20)):
        params = SamplingParams(
            temperature=1.8, top_p=0.99, repetition_penalty=1.3, seed=11, max_new_tokens=10, ignore_eos=True,
            logprobs=n_top,
        )  # fmt: skip
        engine.add_request(rid, ids, params)
    outs = collect(engine)
    ranks = []
    for rid, n_top in (("five", 5), ("twenty", 20)):
        generated = [o.new_token_ids[0] for o in outs[rid]]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1].float()
        logp = logits.log_softmax(-1)  # the raw distribution: no penalty, no temperature
        for i, out in enumerate(outs[rid]):
            (lp,) = out.logprobs
            assert lp.token_id == generated[i]
            assert lp.logprob == pytest.approx(logp[i, generated[i]].item(), abs=1e-4)
            assert lp.rank == int((logp[i] > logp[i, generated[i]]).sum()) + 1
            top = logp[i].topk(n_top)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            ranks.append(lp.rank)
    assert max(ranks) > 1, "sampling at temperature 1.8 should pick a token that is not the most likely"
