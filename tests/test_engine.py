"""The engine on its own: greedy parity with transformers, continuous batching, chunked prefill,
preemption, aborts, seeded sampling."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams
from worker.engine import lookahead as ahead_steps
from worker.engine.tokenizer import load_tokenizer

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\nclass Cache:\n    def __init__(self):\n        self._d = {}\n",
    "x = 1",
    "    return self._cache[key]\n" * 12,  # long: prefilled in chunks under a small budget
    "# Sort a list of integers in ascending order\n",
    "for i in range(10):\n    print(i)\n" * 6,
]


@pytest.fixture(scope="module")
def hf_model(demo_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


def run_to_completion(engine: LLMEngine, late: dict[int, tuple] | None = None) -> dict[str, list]:
    """Step until done; `late` maps a step number to requests added just before it."""
    tokens: dict[str, list[int]] = {}
    finals = {}
    step = 0
    late = dict(late or {})
    while engine.has_unfinished() or late:
        for request_id, ids, params in late.pop(step, ()):
            engine.add_request(request_id, ids, params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
        step += 1
    return {"tokens": tokens, "finals": finals}


def record(seen: dict[str, tuple], outputs: list) -> None:
    """Add each output to its request's (token ids, text, last finish reason) in `seen`."""
    for out in outputs:
        ids, text, _ = seen.get(out.request_id, ([], "", None))
        seen[out.request_id] = (ids + out.new_token_ids, text + out.text, out.finish_reason)


def make_engine(model_dir: Path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), **overrides))


@pytest.mark.parametrize(
    "config",
    [
        {"max_num_batched_tokens": 512, "num_blocks": 512, "max_num_seqs": 16},  # plenty: whole prompts in one step
        {"max_num_batched_tokens": 24, "max_num_seqs": 8, "num_blocks": 512},  # chunked prefill
        # Pool too small: preemption.
        {"max_num_batched_tokens": 64, "max_num_seqs": 8, "num_blocks": 20, "block_size": 8},
    ],
    ids=["roomy", "chunked-prefill", "preemption"],
)
def test_greedy_matches_transformers_generate(demo_model_dir: Path, hf_model, config: dict) -> None:
    engine = make_engine(demo_model_dir, **config)
    tok = engine.tokenizer
    ids = [tok.encode(p).ids for p in PROMPTS]
    lengths = [12, 30, 7, 25, 18, 9]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    # Half join at once, the rest while the others are mid-generation.
    for i in range(3):
        engine.add_request(f"r{i}", ids[i], params[i])
    late = {3: [("r3", ids[3], params[3])], 5: [("r4", ids[4], params[4]), ("r5", ids[5], params[5])]}
    result = run_to_completion(engine, late)
    for i, prompt_ids in enumerate(ids):
        assert result["tokens"][f"r{i}"] == hf_greedy(hf_model, prompt_ids, lengths[i]), f"request r{i}"
        assert result["finals"][f"r{i}"].finish_reason is FinishReason.LENGTH
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks, "every block returned to the pool"
    if config.get("num_blocks") == 20:
        assert stats.num_preemptions > 0, "the small pool should have forced preemptions"


def test_triton_kernels_match_transformers_generate(demo_model_dir: Path, hf_model) -> None:
    """The GPU path (Triton's interpreter when there is no GPU): chunked prefill, mixed and decode steps."""
    engine = make_engine(demo_model_dir, attention_backend="triton", max_num_batched_tokens=40, max_num_seqs=4)
    tok = engine.tokenizer
    ids = [tok.encode(p).ids for p in (PROMPTS[0], PROMPTS[3][:120], PROMPTS[2])]
    for i, prompt_ids in enumerate(ids):
        engine.add_request(f"r{i}", prompt_ids, SamplingParams(max_new_tokens=5, ignore_eos=True))
    result = run_to_completion(engine)
    for i, prompt_ids in enumerate(ids):
        assert result["tokens"][f"r{i}"] == hf_greedy(hf_model, prompt_ids, 5), f"request r{i}"


def test_long_prompt_does_not_stall_running_decodes(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir, max_num_batched_tokens=16, max_num_seqs=4, num_blocks=256)
    tok = engine.tokenizer
    engine.add_request("short", tok.encode("x = 1").ids, SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()  # "short" prefilled, now decoding
    long_ids = tok.encode(PROMPTS[3]).ids
    assert len(long_ids) > 80
    engine.add_request("long", long_ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
    # While "long" is prefilled chunk by chunk, "short" still gets a token every step.
    for _ in range(len(long_ids) // 16):
        produced = {o.request_id for o in engine.step()}
        assert "short" in produced


def test_prefill_takes_a_smaller_share_of_a_step_while_streams_decode(demo_model_dir: Path) -> None:
    engine = make_engine(
        demo_model_dir, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=12, max_num_seqs=16, num_blocks=256
    )
    tok = engine.tokenizer
    long_ids = tok.encode(PROMPTS[3]).ids
    # Idle engine: a prompt gets the whole budget (time to first token).
    engine.add_request("first", long_ids, SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    assert engine.sequences["first"].num_computed_tokens == 64
    while engine.sequences["first"].num_computed_tokens < len(long_ids):
        engine.step()
    engine.step()  # "first" decodes from here on
    engine.add_request("second", list(reversed(long_ids)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    second = engine.sequences["second"]
    computed = []
    while second.num_computed_tokens < len(long_ids):
        produced = {o.request_id for o in engine.step()}
        assert "first" in produced
        computed.append(second.num_computed_tokens)
    chunks = [b - a for a, b in zip([0, *computed], computed, strict=False)]
    assert max(chunks) == 12 and sum(chunks) == len(long_ids)


def test_abort_frees_blocks_and_reports(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir, num_blocks=64)
    tok = engine.tokenizer
    engine.add_request("a", tok.encode(PROMPTS[1]).ids, SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.add_request("b", tok.encode(PROMPTS[0]).ids, SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    (out,) = engine.abort_request("a")
    assert out.finished and out.finish_reason is FinishReason.ABORTED
    assert engine.abort_request("a") == []
    assert engine.stats().num_running == 1
    run_to_completion(engine)
    assert engine.stats().num_free_blocks == 64


def test_seeded_sampling_is_independent_of_batch_companions(demo_model_dir: Path) -> None:
    tok_ids = None
    results = []
    for companions in (0, 5):
        engine = make_engine(demo_model_dir, num_blocks=256)
        tok_ids = tok_ids or engine.tokenizer.encode(PROMPTS[0]).ids
        params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234, max_new_tokens=20, ignore_eos=True)
        for c in range(companions):
            engine.add_request(
                f"c{c}", tok_ids[: 3 + c], SamplingParams(temperature=1.0, seed=c, max_new_tokens=25, ignore_eos=True)
            )
        engine.add_request("target", tok_ids, params)
        results.append(run_to_completion(engine)["tokens"]["target"])
    assert results[0] == results[1]
    # And a different seed gives a different continuation (20 tokens from a 2k vocabulary).
    engine = make_engine(demo_model_dir, num_blocks=256)
    engine.add_request("other", tok_ids, SamplingParams(temperature=0.9, seed=99, max_new_tokens=20, ignore_eos=True))
    assert run_to_completion(engine)["tokens"]["other"] != results[0]


def test_logprobs_match_log_softmax_of_the_models_logits(demo_model_dir: Path, hf_model) -> None:
    engine = make_engine(demo_model_dir, num_blocks=64)
    ids = engine.tokenizer.encode(PROMPTS[4]).ids
    engine.add_request("r", ids, SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=3))
    outputs = [o for _ in range(3) for o in engine.step()]
    generated = [o.new_token_ids[0] for o in outputs]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1].float()
    logp = logits.log_softmax(-1)
    for i, out in enumerate(outputs):
        (lp,) = out.logprobs
        assert lp.token_id == generated[i]
        assert lp.logprob == pytest.approx(logp[i, generated[i]].item(), abs=1e-4)
        assert lp.rank == 1  # greedy picks the most likely
        top = logp[i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()


def test_logprobs_and_prompt_logprobs_of_two_requests_in_one_step(demo_model_dir: Path) -> None:
    """Two requests that want logprobs and prompt logprobs, prefilled in one step: the step's logits hold the
    sampled rows, then the prompt rows. The logprobs come from the sampled rows alone (before, with every
    sampled row wanting them, all the rows went in, and the step raised). Each gets what it gets alone."""
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=True)
    prompts = {"a": PROMPTS[0], "b": PROMPTS[4]}

    def outputs(engine: LLMEngine) -> dict[str, list]:
        seen: dict[str, list] = {}
        while engine.has_unfinished():
            for out in engine.step():
                seen.setdefault(out.request_id, []).append((out.new_token_ids, out.logprobs, out.prompt_logprobs))
        return seen

    together = make_engine(demo_model_dir, num_blocks=64)
    for request_id, text in prompts.items():
        together.add_request(request_id, together.tokenizer.encode(text).ids, params)
    both = outputs(together)
    for request_id, text in prompts.items():
        alone = make_engine(demo_model_dir, num_blocks=64)
        alone.add_request(request_id, alone.tokenizer.encode(text).ids, params)
        expected = outputs(alone)[request_id]
        assert [ids for ids, _, _ in both[request_id]] == [ids for ids, _, _ in expected]
        for (_, lps, prompt_lps), (_, want, want_prompt) in zip(both[request_id], expected, strict=True):
            assert [(lp.token_id, lp.rank) for lp in lps] == [(lp.token_id, lp.rank) for lp in want]
            assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in want], abs=1e-4)
            assert len(prompt_lps) == len(want_prompt)
        assert len(both[request_id][0][2]) == len(together.tokenizer.encode(text).ids) - 1


def test_add_request_rejects_what_can_never_run(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir, num_blocks=4, block_size=16, max_model_len=128)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("a", [1] * 100, SamplingParams(max_new_tokens=50))
    with pytest.raises(ValueError, match="pool"):
        engine.add_request("b", [1] * 60, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("c", [1, engine.vocab_size], SamplingParams(max_new_tokens=1))
    engine.add_request("d", [1, 2, 3], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("d", [1, 2, 3], SamplingParams(max_new_tokens=1))


def test_sampling_noise_is_exponential_and_keyed():
    from worker.engine.sampler import exponential_noise, mix_seed

    keys = torch.tensor([mix_seed(s, t) & 0xFFFFFFFF for s in range(4) for t in range(4)])
    noise = exponential_noise(keys, 50_000)
    assert noise.min() > 0 and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1.0) < 0.01 and abs(noise.var().item() - 1.0) < 0.03  # Exp(1)
    assert torch.equal(noise, exponential_noise(keys, 50_000))  # a pure function of the keys
    # Different keys (seeds, steps) give unrelated rows.
    corr = torch.corrcoef(noise[:, :5000])
    assert (corr - torch.eye(len(keys))).abs().max() < 0.06


def test_sampling_follows_the_distribution(demo_model_dir: Path) -> None:
    """Over many seeds, sampled first tokens follow softmax(logits / temperature)."""
    from worker.engine.sampler import Sampler

    sampler = Sampler(torch.device("cpu"))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * 60])
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
    tokens = sampler(logits.expand(n, -1), params, [0] * n).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=4)[:4].float() / n
    expected = logits[0, :4].softmax(-1)
    assert (freq - expected).abs().max() < 0.03
    # top_k=2 keeps the two most likely only; top_p=0.5 only the first (p=0.64).
    topk = sampler(
        logits.expand(500, -1), [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(500)], [0] * 500
    )
    assert set(topk.token_ids) == {0, 1}
    topp = sampler(
        logits.expand(200, -1), [SamplingParams(temperature=1.0, top_p=0.5, seed=s) for s in range(200)], [0] * 200
    )
    assert set(topp.token_ids) == {0}


def test_prefix_caching_skips_the_shared_prefill_and_keeps_outputs_exact(demo_model_dir: Path, hf_model) -> None:
    engine = make_engine(demo_model_dir, num_blocks=64, block_size=8)
    tok = engine.tokenizer
    shared = tok.encode(PROMPTS[3]).ids  # 96 tokens = 12 full blocks
    first, second = shared + tok.encode("x = 1", add_special_tokens=False).ids, [*shared, 500, 501]
    engine.add_request("first", first, SamplingParams(max_new_tokens=4, ignore_eos=True))
    tokens_first = run_to_completion(engine)["tokens"]["first"]
    engine.add_request("second", second, SamplingParams(max_new_tokens=4, ignore_eos=True))
    batch = engine.scheduler.schedule()  # peek: the second prompt's prefill starts after the shared blocks
    (seq,) = batch.seqs
    assert seq.num_computed_tokens == 96 and batch.num_scheduled_tokens == [len(second) - 96]
    engine.scheduler.running.clear()  # undo the peek (the sequence goes back through the normal path)
    engine.block_manager.free(seq)
    seq.num_computed_tokens = 0
    engine.scheduler.waiting.appendleft(seq)
    tokens_second = run_to_completion(engine)["tokens"]["second"]
    assert tokens_first == hf_greedy(hf_model, first, 4)
    assert tokens_second == hf_greedy(hf_model, second, 4)
    assert engine.stats().prefix_cache_hit_rate > 0.4
    assert engine.stats().num_free_blocks == 64  # cached blocks stay reusable but count as free


def test_cached_blocks_are_evicted_when_the_pool_needs_them(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir, num_blocks=16, block_size=8)
    rng = torch.Generator().manual_seed(0)
    for i in range(6):  # 6 different 60-token prompts: far more blocks than the pool over time
        ids = torch.randint(3, 2000, (60,), generator=rng).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(max_new_tokens=3, ignore_eos=True))
        run_to_completion(engine)
    bm = engine.block_manager
    assert bm.num_free_blocks == 16
    assert len(bm.cached) <= 16 and all(bm.cached[key[0]] == b for b, key in bm.block_key.items())


def test_n_samples_share_the_prompts_kv_blocks(demo_model_dir: Path, hf_model) -> None:
    engine = make_engine(demo_model_dir, num_blocks=256, block_size=8)
    prompt = engine.tokenizer.encode(PROMPTS[3]).ids  # 96 tokens: 12 full blocks
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=6, ignore_eos=True)
    engine.add_request("r", prompt, params, n=4)
    outputs = []
    engine.step()  # (chunked?) prefill under the default budget: one step here
    blocks_after_fork = engine.block_manager.num_used_blocks
    while engine.has_unfinished():
        outputs += engine.step()
    # The prompt's 12 full blocks once, then per sample its own last block(s): far fewer than 4 copies.
    assert blocks_after_fork <= 12 + 4 * 2, blocks_after_fork
    by_index: dict[int, list[int]] = {}
    for out in outputs:
        by_index.setdefault(out.index, []).extend(out.new_token_ids)
    assert sorted(by_index) == [0, 1, 2, 3] and all(len(v) == 5 for v in by_index.values())  # + 1 in the fork step
    assert len({tuple(v) for v in by_index.values()}) > 1, "different seeds, different samples"
    assert engine.stats().num_free_blocks == 256


def test_samples_forked_into_a_full_pool_wait_for_room_instead_of_failing_the_step(demo_model_dir: Path) -> None:
    """A request for n samples whose prompt ends mid-block forks after its prefill: each sample needs a free
    block for its copy of that last block. With none free, the sample waits, as a preempted sequence does, and
    is recomputed when room frees (before, the step raised "out of KV blocks"). Every sample's tokens are the
    ones a roomy pool gives (seeded sampling does not depend on the batch)."""
    tok = load_tokenizer(demo_model_dir)
    hog = tok.encode(PROMPTS[3]).ids[:26]
    prompt = tok.encode(PROMPTS[0]).ids[:6]  # two blocks of 4, the second partly filled
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=8, ignore_eos=True)
    runs = []
    for num_blocks in (256, 10):
        engine = make_engine(demo_model_dir, num_blocks=num_blocks, block_size=4, decode_lookahead=False)
        waited: list[int] = []  # the samples that waited for room
        engine.scheduler.wait_for_room = partial(record_wait, engine.scheduler.wait_for_room, waited)
        engine.add_request("hog", hog, SamplingParams(max_new_tokens=12, ignore_eos=True))
        engine.step()
        engine.add_request("n4", prompt, params, n=4)
        tokens: dict[tuple[str, int], list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        assert engine.stats().num_free_blocks == num_blocks
        runs.append((tokens, waited))
    (roomy, none_waited), (tight, waited) = runs
    assert tight == roomy and len(roomy) == 5 and all(len(t) == 8 for key, t in roomy.items() if key[0] == "n4")
    assert none_waited == [] and waited == [2, 3], waited


def record_wait(wait_for_room, waited: list[int], seq) -> None:
    waited.append(seq.index)
    wait_for_room(seq)


def test_a_forked_sample_continues_exactly_like_a_lone_request_with_its_seed(demo_model_dir: Path) -> None:
    from worker.engine.sampler import sample_seed

    params = SamplingParams(temperature=0.9, seed=77, max_new_tokens=8, ignore_eos=True)
    prompt = make_engine(demo_model_dir, num_blocks=64).tokenizer.encode(PROMPTS[1]).ids
    engine = make_engine(demo_model_dir, num_blocks=256)
    engine.add_request("group", prompt, params, n=3)
    tokens: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.index, []).extend(out.new_token_ids)
    alone = make_engine(demo_model_dir, num_blocks=256)
    alone.add_request(
        "solo", prompt, SamplingParams(temperature=0.9, seed=sample_seed(77, 2), max_new_tokens=8, ignore_eos=True)
    )
    assert run_to_completion(alone)["tokens"]["solo"] == tokens[2]


def test_decode_lookahead_changes_nothing_but_when_steps_are_launched(demo_model_dir: Path) -> None:
    """lookahead.py: decode steps launched before the previous one is read must give the same tokens, texts
    and endings as steps read one by one, with sequences ending by EOS, a stop string, max_new_tokens and an
    abort in the middle, seeded sampling beside greedy, and requests arriving while others decode."""
    probe = make_engine(demo_model_dir, decode_lookahead=False)
    probe.add_request("p", probe.tokenizer.encode(PROMPTS[1]).ids, SamplingParams(max_new_tokens=6, ignore_eos=True))
    end_id = run_to_completion(probe)["tokens"]["p"][5]  # a token greedy decoding reaches: a stop token id
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=30, ignore_eos=True)
    results = []
    for lookahead in (False, True):
        engine = make_engine(demo_model_dir, num_blocks=128, decode_lookahead=lookahead)
        tok = engine.tokenizer
        requests = [
            ("greedy", PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True)),
            ("eos", PROMPTS[1], SamplingParams(max_new_tokens=40, stop_token_ids=(end_id,))),
            ("stop", PROMPTS[0], SamplingParams(max_new_tokens=40, stop=("must",), ignore_eos=True)),
            ("seeded", PROMPTS[1], seeded),
            ("aborted", PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos=True)),
        ]
        for request_id, prompt, params in requests:
            engine.add_request(request_id, tok.encode(prompt).ids, params)
        late = [("late", tok.encode(PROMPTS[1]).ids[:7], SamplingParams(max_new_tokens=12, ignore_eos=True))]
        seen: dict[str, tuple[list[int], str, object]] = {}
        step = 0
        while engine.has_unfinished() or late:
            outputs = engine.abort_request("aborted") if step == 6 else []
            if step == 9:
                engine.add_request(*late.pop())
            record(seen, outputs + engine.step())
            step += 1
        assert engine.stats().num_free_blocks == 128
        results.append((seen, engine.step_timing.steps_ahead))
    (plain, ahead_none), (ahead, steps_ahead) = results
    assert ahead == plain
    assert ahead_none == 0 and steps_ahead > 10
    reasons = {request_id: reason for request_id, (_, _, reason) in plain.items()}
    assert reasons == {
        "greedy": FinishReason.LENGTH, "eos": FinishReason.EOS, "stop": FinishReason.STOP_SEQUENCE,
        "seeded": FinishReason.LENGTH, "aborted": FinishReason.ABORTED, "late": FinishReason.LENGTH,
    }  # fmt: skip


@pytest.mark.parametrize(
    "budget",
    [{}, {"max_num_batched_tokens": 32, "max_prefill_tokens_while_decoding": 12}],
    ids=["whole-prompts", "chunked-prompts"],
)
def test_lookahead_while_requests_wait_for_room_starts_each_of_them_at_the_same_step(
    demo_model_dir: Path, budget: dict
) -> None:
    """A W1-like load in a small KV pool: more requests than fit, so most steps run while others wait. Decode
    steps (with the next prompt chunks) are launched ahead while the waiting ones cannot start, the others
    before the previous step's outputs are returned (lookahead.py), and that changes neither the tokens nor the
    step at which each waiting request starts (its first token comes out of the same step() call as without
    lookahead). With a small step budget, prompts go in chunks beside the decodes, under the prefill cap."""
    ids = [i for text in PROMPTS for i in load_tokenizer(demo_model_dir).encode(text).ids]
    rng = random.Random(5)
    requests = []
    for n in range(14):
        start, length = rng.randrange(0, len(ids) - 90), rng.randint(20, 90)
        params = SamplingParams(max_new_tokens=rng.randint(12, 40), ignore_eos=True)
        if n % 3 == 0:
            params = SamplingParams(temperature=0.8, seed=n, max_new_tokens=params.max_new_tokens, ignore_eos=True)
        requests.append((f"r{n}", ids[start : start + length], params))
    runs = []
    for lookahead in (False, True):
        engine = make_engine(
            demo_model_dir, num_blocks=40, block_size=8, max_num_seqs=6, decode_lookahead=lookahead, **budget
        )
        for request_id, prompt, params in requests:
            engine.add_request(request_id, prompt, params)
        tokens: dict[str, list[int]] = {}
        first_call: dict[str, int] = {}
        calls = ahead_while_waiting = 0
        while engine.has_unfinished():
            waiting, ahead = bool(engine.scheduler.waiting), engine.step_timing.steps_ahead
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                first_call.setdefault(out.request_id, calls)
            ahead_while_waiting += waiting and engine.step_timing.steps_ahead > ahead
            calls += 1
        assert engine.stats().num_free_blocks == 40
        runs.append((tokens, first_call, ahead_while_waiting, engine.step_timing.steps_early))
    (plain, plain_first, none_ahead, none_early), (ahead, ahead_first, steps_ahead, steps_early) = runs
    assert ahead == plain and len(plain) == 14
    assert ahead_first == plain_first
    assert none_ahead == 0 and steps_ahead > 10, steps_ahead
    # The steps that had to be read first went out before the previous one's outputs were returned.
    assert none_early == 0 and steps_early > 5, steps_early


def test_a_prompts_last_token_beside_decodes_in_a_step_launched_ahead(demo_model_dir: Path) -> None:
    """A prompt whose chunk leaves exactly one token, beside streams that decode: the step after it is all
    one-token rows (the shape of a decode step), but that prompt's token comes from the host, the others' from
    the device (lookahead.following_ids). Same tokens as steps read one by one."""
    tok = load_tokenizer(demo_model_dir)
    prompt = tok.encode(PROMPTS[3]).ids[:13]  # a chunk of 12 (the cap while decoding), then 1 token
    runs = []
    for lookahead in (False, True):
        engine = make_engine(
            demo_model_dir, num_blocks=128, max_num_seqs=32, max_num_batched_tokens=64,
            max_prefill_tokens_while_decoding=12, decode_lookahead=lookahead,
        )  # fmt: skip
        for i in range(3):
            engine.add_request(f"d{i}", tok.encode(PROMPTS[i]).ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
        engine.step()  # their prompts; they decode from now on
        engine.add_request("chunked", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        seen: dict[str, tuple[list[int], str, object]] = {}
        while engine.has_unfinished():
            record(seen, engine.step())
        runs.append((seen, engine.step_timing.steps_ahead))
    (plain, _), (ahead, steps_ahead) = runs
    assert ahead == plain and len(plain["chunked"][0]) == 6
    assert steps_ahead > 5


def test_a_stop_string_completed_after_the_next_step_went_out_early_changes_nothing(demo_model_dir: Path) -> None:
    """While requests wait for room, the next step goes out as soon as a step's tokens are read, before they
    become text (step(), "launched before returning"). A stop string that the text then completes ends a
    sequence that already has a token in the step on the GPU: that token is skipped when read, and nothing
    else changes: same tokens, texts and endings as steps read one by one."""
    ids = [i for text in PROMPTS for i in load_tokenizer(demo_model_dir).encode(text).ids]
    rng = random.Random(9)
    prompts = [
        ids[start : start + rng.randint(10, 50)] for start in (rng.randrange(0, len(ids) - 50) for _ in range(10))
    ]
    # Stop strings greedy decoding reaches: three characters from the middle of each prompt's greedy text.
    probe = make_engine(demo_model_dir, num_blocks=256, decode_lookahead=False)
    for i, prompt in enumerate(prompts):
        probe.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
    texts: dict[str, str] = {}
    while probe.has_unfinished():
        for out in probe.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    stops = {request_id: text[len(text) // 2 :][:3] for request_id, text in texts.items()}
    requests = [
        # Lengths that end some generations with a step that must be read first (what makes the next one go
        # out early), stop strings that end the others.
        (f"r{i}", prompt, SamplingParams(max_new_tokens=rng.randint(10, 30), ignore_eos=True, stop=(stop,)))
        for i, prompt in enumerate(prompts)
        if (stop := stops[f"r{i}"]).strip()
    ]
    runs = []
    for lookahead in (False, True):
        engine = make_engine(
            demo_model_dir, num_blocks=24, block_size=8, max_num_seqs=6, max_num_batched_tokens=24,
            max_prefill_tokens_while_decoding=12, decode_lookahead=lookahead,
        )  # fmt: skip
        for request in requests:
            engine.add_request(*request)
        seen: dict[str, tuple[list[int], str, object]] = {}
        stopped_in_flight = 0  # stop strings completed while the next step, launched early, held a token of theirs
        while engine.has_unfinished():
            outputs = engine.step()
            record(seen, outputs)
            early = engine._ahead if engine._ahead is not None and engine._ahead.early else None
            in_early = {seq.request_id for seq in early.batch.seqs} if early else set()
            stopped_in_flight += sum(
                out.finish_reason is FinishReason.STOP_SEQUENCE and out.request_id in in_early for out in outputs
            )
        assert engine.stats().num_free_blocks == 24
        runs.append((seen, stopped_in_flight))
    (plain, none_in_flight), (ahead, in_flight) = runs
    assert ahead == plain
    assert sum(reason is FinishReason.STOP_SEQUENCE for _, _, reason in plain.values()) >= 5
    assert none_in_flight == 0 and in_flight > 0, in_flight


def test_the_step_after_a_mixed_step_is_launched_ahead_and_a_lone_prompt_is_read_first(demo_model_dir: Path) -> None:
    """lookahead.py: a step that carries a whole short prompt next to decodes has a token on the device for every
    sequence, so the next decode step goes out before it is read; the step of a prompt alone (an idle engine)
    is read first, so that its first token waits for nothing. Tokens are those of steps read one by one."""
    tok = load_tokenizer(demo_model_dir)
    runs = []
    for lookahead in (False, True):
        engine = make_engine(demo_model_dir, num_blocks=64, decode_lookahead=lookahead)
        engine.add_request("a", tok.encode(PROMPTS[0]).ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        ahead_after = []  # steps_ahead after each step() call
        for call in range(14):
            if call == 4:
                engine.add_request("b", tok.encode(PROMPTS[2]).ids, SamplingParams(max_new_tokens=6, ignore_eos=True))
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            ahead_after.append(engine.step_timing.steps_ahead)
        runs.append((tokens, ahead_after))
    (plain, none_ahead), (ahead, ahead_after) = runs
    assert ahead == plain and len(plain["a"]) == 12 and len(plain["b"]) == 6
    assert none_ahead[-1] == 0
    assert ahead_after[1] == 0, "the lone prompt's step was not read first"
    assert ahead_after[2] == 1  # from the third step on, decode steps go out ahead
    # Call 4 reads a step launched before "b" came, call 5 the step that prefills "b" next to "a"'s decode;
    # call 6 reads the decode step launched ahead of it.
    assert ahead_after[6] - ahead_after[5] == 1, ahead_after


def engine_beside_a_chunked_prompt(model_dir: Path, lookahead: bool) -> tuple[LLMEngine, list[int]]:
    """An engine whose steps take 24 tokens, with stream "a" started, and a 90-token prompt to add: it goes in
    chunks of at most 23 beside "a"'s decodes."""
    engine = make_engine(
        model_dir, num_blocks=128, max_num_batched_tokens=24, max_num_seqs=8, decode_lookahead=lookahead
    )
    tok = engine.tokenizer
    engine.add_request("a", tok.encode(PROMPTS[0]).ids[:12], SamplingParams(max_new_tokens=30, ignore_eos=True))
    return engine, [i for text in PROMPTS for i in tok.encode(text).ids][:90]


def test_the_step_after_a_prompt_chunk_that_does_not_end_its_prompt_goes_out_before_it_is_read(
    demo_model_dir: Path,
) -> None:
    """lookahead.py: while a prompt is prefilled in chunks next to a running stream, the step with its next chunk
    and the stream's decode is launched before the previous step's tokens are read (its decode input is the
    id still on the device, the chunk's ids come from the host), so the GPU waits neither for the host nor for
    the caller's turn. Tokens are those of steps read one by one."""
    runs = []
    for lookahead in (False, True):
        engine, long_prompt = engine_beside_a_chunked_prompt(demo_model_dir, lookahead)
        tokens: dict[str, list[int]] = {}
        first_call: dict[str, int] = {}
        ahead_while_prefilling = 0
        for call in range(40):
            if call == 3:
                engine.add_request("b", long_prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
            ahead = engine.step_timing.steps_ahead
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                first_call.setdefault(out.request_id, call)
            ahead_while_prefilling += "b" not in first_call and engine.step_timing.steps_ahead > ahead
        runs.append((tokens, first_call, ahead_while_prefilling, engine.step_timing.steps_early))
    (plain, plain_first, none_ahead, none_early), (ahead, ahead_first, ahead_count, _) = runs
    assert ahead == plain and len(plain["a"]) == 30 and len(plain["b"]) == 5
    # One call later: the call that adds "b" reads the decode step launched before it came.
    assert ahead_first == plain_first | {"b": plain_first["b"] + 1}
    # "b"'s 90 tokens take four steps of at most 23 prompt tokens; the three after the first go out ahead.
    assert none_ahead == none_early == 0 and ahead_count >= 3, ahead_count


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_staggered_arrivals_in_chunks_give_the_tokens_of_steps_read_one_by_one(demo_model_dir: Path, seed: int) -> None:
    """Requests arriving at random calls with prompts longer than a step's budget, so that most steps carry
    prompt chunks beside decodes, greedy and seeded sampling, and an abort: with lookahead, steps with the next
    chunks go out before the previous one is read (lookahead.py); every request's tokens, text and ending are
    those of steps read one by one, and every block comes back."""
    ids = [i for text in PROMPTS for i in load_tokenizer(demo_model_dir).encode(text).ids]
    rng = random.Random(seed)
    arrivals = {}
    for n in range(8):
        start, length = rng.randrange(0, len(ids) - 100), rng.randint(30, 100)
        params = SamplingParams(max_new_tokens=rng.randint(4, 24), ignore_eos=True)
        if n % 2:
            params = SamplingParams(temperature=0.9, seed=n, max_new_tokens=params.max_new_tokens, ignore_eos=True)
        arrivals.setdefault(rng.randrange(0, 30), []).append((f"r{n}", ids[start : start + length], params))
    abort_at = rng.randrange(5, 25)
    runs = []
    for lookahead in (False, True):
        engine = make_engine(
            demo_model_dir, num_blocks=96, block_size=8, max_num_seqs=8, max_num_batched_tokens=24,
            max_prefill_tokens_while_decoding=10, decode_lookahead=lookahead,
        )  # fmt: skip
        seen: dict[str, tuple] = {}
        call = 0
        while call < 30 or engine.has_unfinished():
            for request in arrivals.get(call, []):
                engine.add_request(*request)
            outputs = engine.abort_request("r3") if call == abort_at else []
            record(seen, outputs + engine.step())
            call += 1
        assert engine.stats().num_free_blocks == 96
        runs.append((seen, engine.step_timing.steps_ahead))
    (plain, none_ahead), (ahead, steps_ahead) = runs
    assert ahead == plain and len(plain) == 8
    assert none_ahead == 0 and steps_ahead > 10, steps_ahead


@pytest.mark.parametrize("seed", [4, 5])
def test_the_step_planned_ahead_is_the_one_the_scheduler_gives_once_the_step_before_is_read(
    demo_model_dir: Path, seed: int
) -> None:
    """lookahead.py's schedule_following works out, before a step is read, what Scheduler.schedule() will give once
    it is: the same sequences, in the same order, with the same token counts (decodes, and prompt chunks under
    the step budget and the prefill cap). Checked at every step of a run read one by one where nothing arrived
    or left meanwhile and it applies (no request waiting)."""
    ids = [i for text in PROMPTS for i in load_tokenizer(demo_model_dir).encode(text).ids]
    rng = random.Random(seed)
    engine = make_engine(
        demo_model_dir, num_blocks=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=40,
        max_prefill_tokens_while_decoding=12, decode_lookahead=False,
    )  # fmt: skip
    read, schedule = engine._read, engine.scheduler.schedule
    predicted: list = []
    checked = 0

    def predicting_read(step):
        nonlocal predicted
        rows = ahead_steps.followers(step, engine.max_model_len)
        running = engine.scheduler.running
        plan = None
        if rows is not None and not engine.scheduler.waiting and len(step.batch.seqs) == len(running):
            plan = ahead_steps.schedule_following(
                step, rows, ahead_steps.prompt_chunks(step), engine.scheduler, engine.block_manager
            )
        predicted = [(s.key, k) for s, k in zip(plan[0], plan[2], strict=True)] if plan else []
        return read(step)

    def checked_schedule():
        nonlocal checked
        batch = schedule()
        if predicted:
            assert [(s.key, k) for s, k in zip(batch.seqs, batch.num_scheduled_tokens, strict=True)] == predicted
            checked += 1
        return batch

    engine._read, engine.scheduler.schedule = predicting_read, checked_schedule
    for call in range(200):
        if call % 7 == 0 and call < 70:
            start, length = rng.randrange(0, len(ids) - 100), rng.randint(10, 100)
            engine.add_request(
                f"r{call}", ids[start : start + length], SamplingParams(max_new_tokens=rng.randint(3, 30))
            )
            predicted = []  # a new arrival changes the schedule: no prediction stands for it
        engine.step()
        if not engine.has_unfinished() and call >= 70:
            break
    assert checked > 20, checked


def test_a_prompt_aborted_while_its_next_chunk_is_on_the_gpu_leaves_the_others_untouched(demo_model_dir: Path) -> None:
    """A request aborted between two calls while its prompt is prefilled in chunks: its next chunk's step went
    out before the previous one was read (lookahead.py). The abort ends it at once, the chunk in flight is
    skipped when read, its blocks all come back, and the stream beside it gets the tokens of steps read one by
    one."""
    runs = []
    for lookahead in (False, True):
        engine, long_prompt = engine_beside_a_chunked_prompt(demo_model_dir, lookahead)
        tokens: dict[str, list[int]] = {}
        reasons = {}
        for call in range(40):
            outputs = engine.abort_request("b") if call == 6 else []
            if call == 3:
                engine.add_request("b", long_prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
            for out in outputs + engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                reasons[out.request_id] = out.finish_reason
        assert engine.stats().num_free_blocks == 128 and not engine.has_unfinished()
        runs.append((tokens, reasons, engine.step_timing.steps_ahead))
    (plain, plain_reasons, _), (ahead, ahead_reasons, ahead_count) = runs
    assert ahead["a"] == plain["a"] and len(plain["a"]) == 30
    assert not plain.get("b") and not ahead.get("b")  # aborted before its prompt was done: no token
    assert plain_reasons["b"] == ahead_reasons["b"] == FinishReason.ABORTED
    assert ahead_count >= 2  # b's chunks went out ahead before the abort


def test_a_running_prompt_that_sat_a_step_out_is_not_left_behind_decode_steps_launched_ahead(
    demo_model_dir: Path,
) -> None:
    """A prompt chunk can find no budget left in a step (older chunks took it) while the step is otherwise one
    whose follower could go out ahead. Played here by taking "b"'s chunk out of one scheduled step: the next
    step must be scheduled (with "b"), not decode steps launched ahead until "a" ends."""
    engine = make_engine(demo_model_dir, num_blocks=64)
    tok = engine.tokenizer
    engine.add_request("a", tok.encode(PROMPTS[0]).ids, SamplingParams(max_new_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    schedule = engine.scheduler.schedule
    calls = 0

    def schedule_without_b():  # the step after "b" arrives: its chunk finds no budget
        nonlocal calls
        batch = schedule()
        calls += 1
        if calls == 1:
            keep = [i for i, seq in enumerate(batch.seqs) if seq.request_id != "b"]
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.num_scheduled_tokens = [batch.num_scheduled_tokens[i] for i in keep]
        return batch

    engine.scheduler.schedule = schedule_without_b
    engine.add_request("b", tok.encode(PROMPTS[2]).ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    steps = 0
    while "b" not in tokens and steps < 30:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    assert "b" in tokens and steps <= 4, (steps, {k: len(v) for k, v in tokens.items()})
    assert len(tokens["a"]) < 20  # "a" still runs: "b" did not wait for it to end


def test_a_step_launched_ahead_for_aborted_requests_does_not_delay_the_next_request(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir, num_blocks=64)
    ids = engine.tokenizer.encode(PROMPTS[0]).ids
    engine.add_request("a", ids, SamplingParams(max_new_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None  # a decode step is in flight, launched ahead
    engine.abort_request("a")  # (as a worker does when a step fails: everything out, then back one by one)
    engine.add_request("b", ids, SamplingParams(max_new_tokens=3, ignore_eos=True))
    (first,) = engine.step()  # b's prefill runs now, not after reading the aborted request's step
    assert first.request_id == "b" and len(first.new_token_ids) == 1
    run_to_completion(engine)
    assert engine.stats().num_free_blocks == 64
