"""Steps launched one ahead: step n+1 goes to the GPU before step n's tokens are read.

At batch 1 the GPU otherwise idles about 0.3 ms of every 5.3 ms step while the host reads the tokens,
detokenizes, schedules and copies the next step's inputs (benchmarks/profile_decode.py, "launch gap").
When nothing can change the batch but a sequence ending, step n+1 needs nothing from the host that step n
produces: the input of each decoding sequence is its token sampled in step n, still on the device, and its
positions, slots and blocks follow from the counts. So the engine launches it first and reads step n's
tokens while it runs.

A sequence that step n ends (EOS, a stop string) or that is aborted meanwhile has computed one token too
many: it is skipped when step n+1 is read. The KV slot it wrote is in blocks that are free by then; anything
that reuses them runs after it on the same stream.

Mixed steps (prompt chunks next to decodes) are followed too. A sequence whose prompt ended in step n has
its in-flight token at position num_computed_tokens + its chunk, and decodes in step n+1. A prompt whose
chunk did not end it goes on with its next chunk, whose ids are on the host: step n+1 then takes its input
ids from both (following_ids), and its chunks are what Scheduler.schedule() would give once step n is read,
under the same step budget and prefill cap, in the same order (schedule_following; a test checks it against
the scheduler at every step of a run). At 32 streams the steps that carry chunks are the inter-token
latency's tail (benchmarks/step_trace.py); launched ahead, the GPU no longer idles before them.

Steps read at once instead: prompts that all end in a step with no decode beside them (an idle engine:
their first tokens must not wait for the next step's launch), steps that a running sequence sat out (its
chunk found no budget left: it would wait behind the steps launched ahead), steps with logprobs, penalties
(they need the token history on the host), prompt logprobs or forks, when a sequence reaches max_new_tokens
or the model's length with step n, when a running sequence would find no budget in step n+1 or free blocks
are short (a guess never preempts), and under fault injection.

Requests waiting for room do not stop it. Under a full load (W1: 256 prompts, a KV pool that holds about
140 of them) requests wait for most of the run, and until one of the running sequences ends they cannot
start anyway. So a step is launched ahead while sequences wait unless one of them might start with the
next step: a running sequence leaves with step n, or the first waiting one may fit in the free blocks
(Scheduler.could_start_waiting, which errs towards yes). A sequence that ends by EOS or a stop string is
seen only when step n is read; the one it makes room for starts a step later.

Launched before returning. A step that must be read first (a sequence left, a waiting request starts)
leaves the GPU idle until the next one is launched. In the engine alone that is the host's own bookkeeping;
in the worker it is also the loop's work between steps (turning outputs into events, publishing them, the
hand-over to the engine thread and back: about 2.5 ms a step at W1 on the lent H100, benchmarks/serving.py's
worker time). So while requests wait for room, or a running prompt goes on in chunks, step() schedules and
launches the next step right after reading one's tokens, before they become text and outputs (detokenization,
stop strings: +1.8 % W1 for the engine alone, run 85). A stop string found then ends a sequence that has a
token in the step just launched: skipped when read, as above. A request added or aborted
between two calls is seen a step later: under such a load it would queue behind those waiting, or behind
the chunk's longer step (an aborted one computes a token too many, skipped as above).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.engine.block_manager import BlockManager
from worker.engine.model_runner import to_device
from worker.engine.scheduler import ScheduledBatch, Scheduler, running_share
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


def followers(step: LaunchedStep, max_model_len: int) -> list[int] | None:
    """The rows of `step` (indices into step.sampled) whose sequences decode in the next step, launched before
    `step`'s tokens are read; None if it cannot be launched ahead (see the module's docstring). The caller
    has checked what is not per sequence, and plans the prompt chunks that go on (prompt_chunks)."""
    if step.prompt_spans:
        return None
    partial = len(step.sampled) < len(step.batch.seqs)
    if not step.plan.is_decode and not partial and 1 not in step.batch.num_scheduled_tokens:
        # Prompts that all end here, with no decode beside them (an idle engine): read first, so that their
        # first tokens do not wait for the next step's launch.
        return None
    for seq in step.batch.seqs:
        p = seq.params
        if not seq.is_finished and (p.logprobs >= 0 or p.has_penalties or seq.prompt_logprobs is not None):
            return None
    rows = []
    for row, seq in enumerate(step.sampled):
        if seq.is_finished:  # aborted since `step` was launched (itself launched ahead)
            continue
        # After this step's token: generated + 1. A sequence whose length ends it with this step stays out.
        if seq.num_generated_tokens + 1 < seq.params.max_new_tokens and seq.num_tokens + 1 < max_model_len:
            rows.append(row)
    return rows


def prompt_chunks(step: LaunchedStep) -> dict[str, int]:
    """The sequences of `step` whose prompt chunk does not end their prompt (by key): the tokens they compute
    in it. Their next chunk follows from the counts; its ids are on the host."""
    sampled = {seq.key for seq in step.sampled}
    return {
        seq.key: n
        for seq, n in zip(step.batch.seqs, step.batch.num_scheduled_tokens, strict=True)
        if seq.key not in sampled and not seq.is_finished
    }


def plan_following(
    seqs: list[Sequence], computing: list[int], scheduled: list[int], block_manager: BlockManager, block_size: int
) -> StepPlan:
    """The step after the one in flight, where each sequence computes `computing` tokens from its
    num_computed_tokens, then `scheduled` tokens here. A sequence whose token sampled in flight is its input
    gets a placeholder id (the caller writes the in-flight step's sampled ids, on the device); a prompt's next
    chunk takes its ids from the host. Sampled rows: those placeholders, and chunks that end their prompt."""
    plan = StepPlan([], [], [], [], [], [], [], [], [])
    for i, (seq, n, k) in enumerate(zip(seqs, computing, scheduled, strict=True)):
        block_manager.allocate(seq, n + k)  # the in-flight tokens have their slots; this adds these
        start = seq.num_computed_tokens + n
        end = start + k
        pending = start == seq.num_tokens  # its input is the token still in flight
        table = seq.block_table
        plan.query_starts.append(len(plan.input_ids))
        plan.query_lens.append(k)
        plan.context_lens.append(end)
        plan.block_tables.append(table)
        plan.input_ids.extend([0] if pending else seq.token_ids[start:end])
        plan.positions.extend(range(start, end))
        plan.slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        if pending or end == seq.num_tokens:
            plan.sample_indices.append(len(plan.input_ids) - 1)
            plan.sampled_seq_indices.append(i)
    return plan


def schedule_following(
    step: LaunchedStep, rows: list[int], chunks: dict[str, int], scheduler: Scheduler, block_manager: BlockManager
) -> tuple[list[Sequence], list[int], list[int], list[int | None]] | None:
    """What schedule() would give the running sequences once `step` is read, worked out before: a decode for
    each of `rows`, the next chunk of each unfinished prompt under the same budgets, in the same order.
    Returns (sequences, tokens each computes in `step`, tokens each computes next, the row of `step` whose
    sampled id is its input or None), or None where the schedule would differ: a running sequence left
    without budget, or blocks short (a guess never preempts)."""
    decoding = {step.sampled[row].key: row for row in rows}
    in_step = {seq.key: n for seq, n in zip(step.batch.seqs, step.batch.num_scheduled_tokens, strict=True)}
    left = {
        seq.key: seq.num_tokens - seq.num_computed_tokens - chunks[seq.key]
        for seq in step.batch.seqs
        if seq.key in chunks
    }
    budget = scheduler.max_num_batched_tokens
    # schedule() counts the sequences with one token left as decoding, a prompt's last token included.
    prefill_budget = scheduler.prefill_budget(len(decoding) + sum(n == 1 for n in left.values()))
    seqs, computing, scheduled, sources = [], [], [], []
    for seq in scheduler.running:
        key = seq.key
        if key not in decoding and key not in left:
            continue  # it leaves with `step`
        if budget <= 0:
            return None
        k = running_share(1 if key in decoding else left[key], budget, prefill_budget)
        if k == 0:
            return None
        if k > 1:
            prefill_budget -= k
        budget -= k
        seqs.append(seq)
        computing.append(in_step[key])
        scheduled.append(k)
        sources.append(decoding.get(key))
    if not seqs:
        return None  # every sequence leaves with `step`
    needed = sum(block_manager.blocks_needed(s, n + k) for s, n, k in zip(seqs, computing, scheduled, strict=True))
    return (seqs, computing, scheduled, sources) if needed <= block_manager.num_free_blocks else None


def following_ids(step: LaunchedStep, plan: StepPlan, sources: list[int | None]) -> torch.Tensor:
    """The following step's input ids on the device: `step`'s sampled ids where they are the input, the
    host's prompt ids elsewhere. Copies are queued, never waited for: `step` is still computing."""
    device_ids = step.tokens.device
    rows = [row for row in sources if row is not None]
    device = device_ids.device
    # Every input in flight. (A step of one-token rows is not enough: a prompt's last token, after a chunk
    # that left just it, has the shape of a decode but its id on the host.)
    if len(rows) == len(sources):
        return device_ids if rows == list(range(len(step.sampled))) else device_ids[to_device(rows, device)]
    ids = to_device(plan.input_ids, device)
    if rows:
        at = [plan.query_starts[i] for i, row in enumerate(sources) if row is not None]
        ids[to_device(at, device)] = device_ids[to_device(rows, device)].to(ids.dtype)
    return ids
