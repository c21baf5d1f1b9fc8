"""What one step computes, laid out flat on the host: the bridge from the scheduler to the model runner.

A scheduled batch becomes one packed list of tokens (each sequence's scheduled tokens, in batch order),
their positions and KV slots, and per sequence where its tokens start, how many there are, its context
length after the step and its block table. Rows whose logits are needed are the last token of every
sequence whose scheduled tokens reach its end (decodes, and the last chunk of a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.scheduler import ScheduledBatch
from worker.engine.sequence import Sequence


@dataclass
class StepPlan:
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_indices: list[int]  # rows of the packed batch to compute logits for
    sampled_seq_indices: list[int]  # index in the batch of the sequence each sampled row belongs to

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, each sampled: the shape CUDA graphs are captured for."""
        return len(self.input_ids) == self.num_seqs == len(self.sample_indices)


def plan_step(batch: ScheduledBatch, block_size: int) -> StepPlan:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    plan = StepPlan(input_ids, positions, slots, [], [], [], [], [], [])
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_scheduled_tokens, strict=True)):
        start = seq.num_computed_tokens
        end = start + n
        table = seq.block_table
        plan.query_starts.append(len(input_ids))
        plan.query_lens.append(n)
        plan.context_lens.append(end)
        plan.block_tables.append(table)
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        if n == 1:
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        if end == seq.num_tokens:
            plan.sample_indices.append(len(input_ids) - 1)
            plan.sampled_seq_indices.append(i)
    return plan


def write_block_tables(out, plan: StepPlan, block_size: int) -> int:
    """Row i of `out` (a numpy array: filling it from lists is several times cheaper than torch): sequence
    i's blocks that cover its context after the step; entries past them are left as they are. Returns the
    widest row's width."""
    width = 1
    for i, (table, context) in enumerate(zip(plan.block_tables, plan.context_lens, strict=True)):
        used = -(-context // block_size)
        out[i, :used] = table[:used]
        width = max(width, used)
    return width


def prompt_logprob_spans(batch: ScheduledBatch, plan: StepPlan) -> list[tuple[Sequence, range, list[int]]]:
    """The extra logits rows this step needs for prompt logprobs, per sequence that wants them: (sequence,
    rows of the packed batch, the prompt tokens those rows predict). Row of position p predicts token
    p + 1, so positions 0 .. num_prompt_tokens - 2 are needed (the last prompt position is the sampled
    row); positions already done (before a preemption) are not asked again. Prefix-cache reuse would skip
    positions without computing them: the scheduler must not reuse a cached prefix for these sequences."""
    spans = []
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_scheduled_tokens, strict=True)):
        if seq.prompt_logprobs is None:
            continue
        start, done, end = seq.num_computed_tokens, len(seq.prompt_logprobs), seq.num_prompt_tokens - 1
        lo, hi = max(start, done), min(start + n, end)
        if lo >= hi:
            continue
        if start > done:
            raise RuntimeError(
                f"request {seq.request_id!r}: prompt positions {done}..{start - 1} were taken from the prefix "
                "cache without logits; sequences with prompt_logprobs must not reuse cached blocks"
            )
        first = plan.query_starts[i] - start
        spans.append((seq, range(first + lo, first + hi), seq.token_ids[lo + 1 : hi + 1]))
    return spans


class CopyFence:
    """For pinned host buffers that every step rewrites and copies to the device asynchronously: a copy reads
    its host buffer when the GPU gets to it, so the buffer must not be rewritten before the last step's
    copies have run. With decode lookahead the next step's inputs are written while the step before them is
    still queued; this makes the order a rule instead of a race that timing happens to win."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._recorded = False

    def wait(self) -> None:
        """Before writing the host buffers (returns at once when the copies have run, as they nearly always have)."""
        if self._recorded:
            self._event.synchronize()

    def mark(self) -> None:
        """After queueing the copies."""
        if self._event is not None:
            self._event.record()
            self._recorded = True
