"""Random loads, each run twice: with steps launched ahead and early (lookahead.py) and with steps read one by
one, and once more in a pool too large for any preemption. All must give the same tokens, texts and endings,
free every block, never run more than max_num_seqs sequences, and never raise. Seeded: a failure names its
seed. Four bugs were found this way: three steps that raised (a prompt's last token beside decodes in a step
launched ahead, samples forked into a full KV pool, logprobs in a step that also had prompt logprobs), and
samples forked past max_num_seqs (on the GPU, a step larger than the Triton backend's static buffers)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.test_engine import PROMPTS, make_engine
from worker.engine import FinishReason, LLMEngine, SamplingParams
from worker.engine.tokenizer import load_tokenizer

STOP_STRINGS = ["must", "ine", "  ", "e", "(", "re", "in"]


def random_load(ids: list[int], seed: int) -> tuple[dict, list[tuple[int, str, list[int], SamplingParams, int]]]:
    """(engine settings, requests as (step to add it at, id, prompt, params, samples)), from `seed`."""
    rng = random.Random(seed)
    config = {
        "num_blocks": rng.choice([16, 24, 40, 128]),
        "block_size": rng.choice([4, 8, 16]),
        "max_num_seqs": rng.choice([2, 4, 6, 8]),
    }
    if rng.random() < 0.6:  # small step budgets: prompts in chunks, beside decodes under the prefill cap
        config["max_num_batched_tokens"] = max(rng.choice([16, 24, 32, 64]), config["max_num_seqs"])
        config["max_prefill_tokens_while_decoding"] = rng.choice([0, 5, 12])
    capacity = config["num_blocks"] * config["block_size"]
    requests = []
    for i in range(rng.randint(3, 12)):
        length = rng.randint(1, min(80, capacity // 3))
        start = rng.randrange(0, len(ids) - length)
        kw: dict = {"max_new_tokens": rng.randint(1, 25), "ignore_eos": rng.random() < 0.7}
        kind = rng.random()
        if kind < 0.3:
            kw |= {"temperature": 0.8, "top_p": 0.9, "seed": i}
        elif kind < 0.4:
            kw |= {"logprobs": 2}
        elif kind < 0.45:
            kw |= {"repetition_penalty": 1.2}
        elif kind < 0.5:
            kw |= {"prompt_logprobs": True}
        if rng.random() < 0.3:
            kw["stop"] = (rng.choice(STOP_STRINGS),)
        if rng.random() < 0.1:
            kw["min_new_tokens"] = min(2, kw["max_new_tokens"])
        samples = 2 if rng.random() < 0.1 and "prompt_logprobs" not in kw else 1
        arrives = rng.choice([0, 0, rng.randint(0, 20)])
        requests.append((arrives, f"r{i}", ids[start : start + length], SamplingParams(**kw), samples))
    return config, sorted(requests, key=lambda r: r[0])


def run(engine: LLMEngine, requests: list) -> dict[tuple[str, int], tuple[list[int], str, FinishReason | None]]:
    seen: dict[tuple[str, int], tuple[list[int], str, FinishReason | None]] = {}
    pending, step = list(requests), 0
    while engine.has_unfinished() or pending:
        while pending and pending[0][0] <= step:
            _, request_id, prompt, params, samples = pending.pop(0)
            engine.add_request(request_id, prompt, params, n=samples)
        for out in engine.step():
            ids, text, _ = seen.get((out.request_id, out.index), ([], "", None))
            seen[(out.request_id, out.index)] = (ids + out.new_token_ids, text + out.text, out.finish_reason)
        # (On the GPU a step of more sequences overruns the static buffers of the Triton backend and graphs.)
        assert len(engine.scheduler.running) <= engine.config.max_num_seqs
        step += 1
        assert step < 2000, "no progress"
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    return seen


# 5300, 9003 and 20132 made the engine raise before the fixes (aeb9495, beb47cb, 836cf14); 5300, 9003, 9005,
# 9007, 9010 and 9013 ran more than max_num_seqs sequences before forks waited for a seat.
@pytest.mark.parametrize("seed", [5300, 20132, *range(9000, 9014)])
def test_steps_launched_ahead_and_preemptions_change_nothing_under_random_loads(
    demo_model_dir: Path, seed: int
) -> None:
    """The load with steps read one by one, with steps launched ahead, and with a pool so large that nothing is
    ever preempted: seeded sampling does not depend on the batch, so all three agree."""
    ids = [i for text in PROMPTS for i in load_tokenizer(demo_model_dir).encode(text).ids]
    config, requests = random_load(ids, seed)
    plain = run(make_engine(demo_model_dir, decode_lookahead=False, **config), requests)
    ahead = run(make_engine(demo_model_dir, decode_lookahead=True, **config), requests)
    roomy = run(make_engine(demo_model_dir, decode_lookahead=True, **(config | {"num_blocks": 1024})), requests)
    assert ahead == plain
    assert roomy == plain
