"""Decode steps launched one ahead: step n+1 goes to the GPU before step n's tokens are read.

At batch 1 the GPU otherwise idles about 0.3 ms of every 5.3 ms step while the host reads the tokens,
detokenizes, schedules and copies the next step's inputs (benchmarks/profile_decode.py, "launch gap").
When step n is a pure decode step and nothing can change the batch but a sequence ending, step n+1 needs
nothing from the host that step n produces: its input ids are step n's sampled ids, still on the device,
and its positions, slots and blocks follow from the counts. So the engine launches it first and reads step
n's tokens while it runs.

A sequence that step n ends (EOS, a stop string) or that is aborted meanwhile has computed one token too
many: it is skipped when step n+1 is read. The KV slot it wrote is in blocks that are free by then; anything
that reuses them runs after it on the same stream.

A mixed step n (prompt chunks next to decodes) is followed the same way when each of its chunks ends its
prompt: every sequence of it then has a sampled token on the device, and step n+1 decodes them all; a
sequence whose prompt ended in step n has its in-flight token at position num_computed_tokens + its chunk.

Steps read at once instead, as before: a prompt's step alone (an idle engine: its first token must not wait
for the next step's launch), steps with a prompt chunk that does not end its prompt, steps that a running
sequence sat out (its chunk found no budget left: it would wait behind the steps launched ahead), steps
with logprobs, penalties (they need the token history on the host) or forks, when a sequence reaches
max_new_tokens or the model's length with step n, when free blocks are short (a guess never preempts), and
under fault injection.

Requests waiting for room do not stop it. Under a full load (W1: 256 prompts, a KV pool that holds about
140 of them) requests wait for most of the run, and until one of the running sequences ends they cannot
start anyway. So a step is launched ahead while sequences wait unless one of them might start with the
next step: a running sequence leaves with step n, or the first waiting one may fit in the free blocks
(Scheduler.could_start_waiting, which errs towards yes). A sequence that ends by EOS or a stop string is
seen only when step n is read; the one it makes room for starts a step later.

Launched before returning. A step that must be read first (a sequence left, a prompt chunk goes on, a
waiting request starts) leaves the GPU idle until the next one is launched. In the engine alone that is the
host's own bookkeeping; in the worker it is also the loop's work between steps (turning outputs into events,
publishing them, the hand-over to the engine thread and back: about 2.5 ms a step at W1 on the lent H100,
benchmarks/serving.py's worker time). So while requests wait for room, step() schedules and launches the
next step right after reading one, before returning its outputs. A request added or aborted between two
calls is seen a step later, which under such a load changes nothing for it: it would queue behind those
waiting (an aborted one computes a token too many, skipped as above).
The same holds while a running prompt goes on in chunks: the next step carries its next chunk whatever
arrives meanwhile, and every running stream waits for that longer step; without it, the stream also waited
for the worker's turn (at 32 streams these gaps are the inter-token latency's tail,
benchmarks/step_trace.py). A request that arrives then starts a step later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import ScheduledBatch
from worker.engine.sequence import Sequence
from worker.engine.step_inputs import StepPlan


class PendingTokens:
    """A step's chosen token ids: on the device at once, on the host when read. The copy to the host is
    queued right after the sampling, so reading it waits for this step only, not for one launched after."""

    def __init__(self, token_ids: torch.Tensor) -> None:
        self.device = token_ids
        self._event: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = token_ids

    def read(self) -> list[int]:
        """The ids (waits for the step's sampling): the step's one host sync."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


@dataclass
class LaunchedStep:
    """A step on the GPU whose tokens the engine has not read yet."""

    batch: ScheduledBatch
    plan: StepPlan
    sampled: list[Sequence]  # the sequence of each sampled row
    logits: torch.Tensor
    tokens: PendingTokens
    prompt_spans: list = field(default_factory=list)  # (sequence, rows, targets) of prompt logprobs
    ahead: bool = False  # launched before the previous step's tokens were read
    early: bool = False  # launched before the previous step's outputs were returned
    started: float = 0.0  # perf_counter marks, for StepTiming
    planned: float = 0.0
    launched: float = 0.0


def followers(step: LaunchedStep, block_manager: BlockManager, max_model_len: int) -> list[int]:
    """The rows of `step` (indices into step.sampled) whose sequences the next decode step can run before
    `step`'s tokens are read; [] if it cannot be launched ahead (see the module's docstring). The caller
    has checked what is not per sequence."""
    if step.prompt_spans:
        return []
    if not step.plan.is_decode and not (
        # A mixed step whose prompt chunks all end their prompts: each of its sequences has a token on the
        # device, so the next step decodes them all. A lone prompt's step (an idle engine) is read first: its
        # first token would otherwise wait for the next step's launch.
        len(step.sampled) == len(step.batch.seqs) and 1 in step.batch.num_scheduled_tokens
    ):
        return []
    rows = []
    for row, seq in enumerate(step.sampled):
        if seq.is_finished:  # aborted since `step` was launched (itself launched ahead)
            continue
        p = seq.params
        if p.logprobs >= 0 or p.has_penalties:
            return []
        # After this step's token: generated + 1. A sequence whose length ends it with this step stays out.
        if seq.num_generated_tokens + 1 < p.max_new_tokens and seq.num_tokens + 1 < max_model_len:
            rows.append(row)
    needed = sum(block_manager.blocks_needed(step.sampled[row], in_flight(step, row) + 1) for row in rows)
    return rows if needed <= block_manager.num_free_blocks else []


def in_flight(step: LaunchedStep, row: int) -> int:
    """Tokens the sequence of `row` computes in `step` (1 for a decode; its chunk for a prompt's last)."""
    return step.batch.num_scheduled_tokens[step.plan.sampled_seq_indices[row]]


def plan_following(
    seqs: list[Sequence], computing: list[int], block_manager: BlockManager, block_size: int
) -> StepPlan:
    """The decode step after the one in flight, where each sequence computes `computing` tokens from its
    num_computed_tokens: its token sampled there sits at the position after them, with a block for the
    next one. Input ids are placeholders: the caller passes the in-flight step's sampled ids, on the device."""
    plan = StepPlan([], [], [], [], [], [], [], [], [])
    for i, (seq, n) in enumerate(zip(seqs, computing, strict=True)):
        block_manager.allocate(seq, n + 1)  # the in-flight tokens have their slots; this adds the next one
        position = seq.num_computed_tokens + n
        table = seq.block_table
        plan.input_ids.append(0)
        plan.positions.append(position)
        plan.slots.append(table[position // block_size] * block_size + position % block_size)
        plan.query_starts.append(i)
        plan.query_lens.append(1)
        plan.context_lens.append(position + 1)
        plan.block_tables.append(table)
        plan.sample_indices.append(i)
        plan.sampled_seq_indices.append(i)
    return plan
