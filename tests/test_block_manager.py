"""KV block pool bookkeeping and scheduler admission, without a model."""

from __future__ import annotations

import random

from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence, SequenceStatus


def seq(request_id: str, n: int, max_new: int = 8) -> Sequence:
    return Sequence(request_id, list(range(1, n + 1)), n, SamplingParams(max_new_tokens=max_new), detokenizer=None)


def test_blocks_are_allocated_by_need_and_all_returned():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq("a", 9)
    assert bm.blocks_needed(s, 9) == 3
    bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    s.num_computed_tokens = 9
    assert bm.blocks_needed(s, 3) == 0  # slots 9..11 fit the third block
    assert bm.blocks_needed(s, 4) == 1
    bm.free(s)
    assert bm.num_free_blocks == 10 and not s.block_table and bm.ref_counts == [0] * 11
    assert 0 not in bm.free_blocks, "block 0 is the null block"


def test_scheduler_chunks_prefill_under_the_token_budget_and_decodes_first():
    config = EngineConfig(model="unused", max_num_batched_tokens=8, max_num_seqs=4)
    sched = Scheduler(config, BlockManager(num_blocks=100, block_size=4))
    running = seq("running", 3)
    sched.add(running)
    batch = sched.schedule()
    assert batch.num_scheduled_tokens == [3]
    running.num_computed_tokens = 3
    running.token_ids.append(99)  # sampled: now one decode token to compute
    long = seq("long", 20)
    sched.add(long)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["running", "long"]
    assert batch.num_scheduled_tokens == [1, 7]  # decode first, then what the budget leaves


def test_scheduler_preempts_the_newest_when_blocks_run_out():
    config = EngineConfig(model="unused", max_num_batched_tokens=64, max_num_seqs=4)
    bm = BlockManager(num_blocks=5, block_size=4)
    sched = Scheduler(config, bm)
    old, new = seq("old", 8), seq("new", 8)
    sched.add(old)
    sched.add(new)
    assert len(sched.schedule()) == 2 and bm.num_free_blocks == 1
    for s in (old, new):
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(5)
    # Both need a third block for their 9th token; one is free: the older gets it, the newer is preempted.
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["old"]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and not new.block_table
    assert sched.waiting[0] is new and sched.num_preemptions == 1


def test_could_start_waiting_never_says_no_when_the_next_schedule_starts_the_first_waiting_sequence():
    """The engine launches a decode step ahead while sequences wait only when could_start_waiting() says no
    (lookahead.py). A wrong no would start the waiting sequence a step late; this checks, over random pool
    states (free blocks, batch sizes, prompt lengths, prefixes already cached), that a no is always right,
    and that it is not a no every time (else the engine would never launch ahead while sequences wait)."""
    rng = random.Random(20261126)
    answers = {True: 0, False: 0}
    for _ in range(300):
        bm = BlockManager(num_blocks=rng.randint(8, 60), block_size=4)
        config = EngineConfig(
            model="unused", max_num_batched_tokens=rng.choice([16, 32, 64]), max_num_seqs=rng.randint(1, 6),
            max_prefill_tokens_while_decoding=rng.choice([0, 4, 8]),
        )  # fmt: skip
        sched = Scheduler(config, bm)
        shared = [rng.randint(1, 50) for _ in range(12)]  # a prompt prefix the waiting sequence may share
        for i in range(rng.randint(0, config.max_num_seqs)):
            running = Sequence(f"r{i}", shared + [rng.randint(1, 50) for _ in range(rng.randint(1, 14))], 0,
                               SamplingParams(), detokenizer=None)  # fmt: skip
            running.num_prompt_tokens = running.num_tokens
            if running.num_tokens > config.max_num_batched_tokens:
                continue
            sched.add(running)
            batch = sched.schedule()
            if running not in batch.seqs:
                sched.finish(running)
                continue
            running.num_computed_tokens += batch.num_scheduled_tokens[batch.seqs.index(running)]
            bm.register_full_blocks(running)
            if running.num_uncomputed_tokens == 0:
                running.token_ids.append(7)  # prefilled and sampled: one token to decode next
        if any(s.num_uncomputed_tokens != 1 for s in sched.running):
            continue
        prefix = shared[: rng.choice([0, 4, 8, 12])]
        head = Sequence("head", prefix + [rng.randint(51, 99) for _ in range(rng.randint(1, 40))], 0,
                        SamplingParams(), detokenizer=None)  # fmt: skip
        head.num_prompt_tokens = head.num_tokens
        sched.add(head)
        free = bm.num_free_blocks
        said = sched.could_start_waiting()
        assert not head.block_table and head.num_computed_tokens == 0 and bm.num_free_blocks == free  # took nothing
        started = head in sched.schedule().seqs
        assert said or not started, "could_start_waiting said no, and schedule() started it"
        answers[said] += 1
    assert answers[False] > 20 and answers[True] > 20, answers
