"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step mixes the decode tokens of running sequences with prefill chunks of new ones under one token
budget (`max_num_batched_tokens`). Running sequences go first, oldest first, so a long prompt arriving
never stalls the streams already running: it is prefilled a chunk at a time with what the budget leaves.
While sequences are decoding, prefill chunks get at most `max_prefill_tokens_while_decoding` of a step,
or the budget's share of the decoding sequences in max_num_seqs when that is more: a step's time grows
with its tokens and every running stream waits for the whole step, so a large chunk next to a small decode
batch would show as a spike in everyone's inter-token latency. Without decodes (an idle engine, T1) a
prompt takes the whole budget.
When the KV pool runs out, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the queue, to be recomputed (prompt + tokens generated so far) when blocks free up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    # Tokens of each sequence computed in this step, starting at its num_computed_tokens.
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


def running_share(uncomputed: int, budget: int, prefill_budget: int) -> int:
    """Tokens a running sequence computes in a step that has `budget` tokens left: one to decode, or the next
    chunk of its prompt within the prefill budget too (0: none left for it)."""
    num_tokens = min(uncomputed, budget)
    return min(num_tokens, prefill_budget) if num_tokens > 1 else num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_prefill_tokens_while_decoding = (
            config.max_prefill_tokens_while_decoding or config.max_num_batched_tokens
        )
        self.block_manager = block_manager
        # Blocks kept free when admitting new work, so running sequences can grow a little before anyone
        # is preempted (admitting into a full pool only to preempt at the next step is wasted prefill).
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        # In arrival order: the oldest keep their blocks when memory runs out.
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def adopt(self, parent: Sequence, child: Sequence, copy_block) -> None:
        """A sample forked from `parent` joins the running batch, sharing the parent's KV blocks (its partly
        filled last one copied), if the batch has a seat and a block is free for that copy; else it waits."""
        if len(self.running) < self.max_num_seqs and self.block_manager.can_fork(parent):
            self.block_manager.fork(parent, child, copy_block)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            self.wait_for_room(child)

    def wait_for_room(self, seq: Sequence) -> None:
        """A sequence that holds no KV blocks but has tokens (a forked sample that found no seat in the batch or
        no block for its copy) waits at the front, as a preempted one does: recomputed when room frees."""
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        prefill_budget = self.prefill_budget(sum(s.num_uncomputed_tokens == 1 for s in self.running))

        # 1. Running sequences: one decode token each, or the next chunk of an unfinished prefill.
        scheduled: list[Sequence] = []
        candidates = list(self.running)
        while candidates and budget > 0:
            seq = candidates.pop(0)
            num_tokens = running_share(seq.num_uncomputed_tokens, budget, prefill_budget)
            if num_tokens == 0:
                continue
            while not self.block_manager.can_allocate(seq, num_tokens):
                # Preempt the newest sequence not yet scheduled in this step; if there is none, this one.
                victim = candidates.pop() if candidates else seq
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, num_tokens)
                scheduled.append(seq)
                batch.seqs.append(seq)
                batch.num_scheduled_tokens.append(num_tokens)
                budget -= num_tokens
                if num_tokens > 1:
                    prefill_budget -= num_tokens

        # 2. Waiting sequences, first come first served, while budget, slots and blocks last. A preempted
        # sequence was put back at the front, so it is resumed before anything newer starts.
        # Blocks the running sequences will need soon (the rest of their prompt, their next token) are kept
        # free when admitting: admitting into that room would only cause preemptions and recomputation.
        reserve = sum(self.block_manager.blocks_needed(s, s.num_uncomputed_tokens + 1) for s in self.running)
        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            reused = self.block_manager.take_cached_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget, prefill_budget)
            needed = self.block_manager.blocks_needed(seq, num_tokens)
            room = self.block_manager.num_free_blocks - (reserve + self.watermark_blocks if self.running else 0)
            if needed > room:
                # Waiting sequences hold no blocks (else they could starve the running ones, or each other).
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            self.block_manager.record_prefix_lookup(seq.num_tokens, reused)
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_tokens)
            reserve += self.block_manager.blocks_needed(seq, seq.num_uncomputed_tokens - num_tokens + 1)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_scheduled_tokens.append(num_tokens)
            budget -= num_tokens
            prefill_budget -= num_tokens
        return batch

    def prefill_budget(self, decoding: int) -> int:
        budget = self.max_num_batched_tokens
        if not decoding:
            return budget
        # A large decode batch makes a long step anyway (KV reads, GEMMs no longer weight-bound), so the
        # prefill share grows with it: W1-like loads refill their batch as fast as without the cap.
        scaled = budget * decoding // self.max_num_seqs
        return min(budget, max(self.max_prefill_tokens_while_decoding, scaled))

    def could_start_waiting(self) -> bool:
        """Whether the next schedule() might start the first waiting sequence, if every running sequence
        decodes and none frees its blocks first. Takes nothing. It errs towards yes: the blocks those decodes
        and the running sequences' reserve will take are not held back. The engine launches a decode step
        ahead while sequences wait only on a no (lookahead.py), so a wrong no would start one a step late."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        seq = self.waiting[0]
        decoding = len(self.running)
        reused = self.block_manager.cached_prefix_tokens(seq)
        chunk = min(seq.num_tokens - reused, self.max_num_batched_tokens - decoding, self.prefill_budget(decoding))
        needed = -(-(reused + chunk) // self.block_manager.block_size) - reused // self.block_manager.block_size
        room = self.block_manager.num_free_blocks - (self.watermark_blocks if self.running else 0)
        return needed <= room

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
