"""Prefill (and mixed) steps of a few sequences as CUDA graphs, one per padded token count.

Why: an eager step launches about 300 kernels at about 30 µs of host time each, 9-10 ms whatever its
length (`python -m benchmarks.profile_decode --prefill-only`), while on an H100 the GPU needs 6.9 ms for a
128-token prompt and 11.4 ms for a 512-token one. Short prompts, the usual ones of code completion, wait on
the host, and their time to first token moves with how busy the host is. Replayed as a graph, the step
costs the GPU's time and one launch.

How: as for decode (cuda_graphs.py), inputs go through static buffers and the step is padded.
- Tokens are padded up to the next size of a ladder (16, multiples of 32 up to 512, of 64 up to 1,024: at
  most about 0.4 ms of wasted GPU time per step). Padding tokens sit at position 0, write their K/V into
  the null block and belong to no sequence, so no attention tile reads them; their rows compute garbage
  that nobody reads (rows never mix in a Llama layer outside attention).
- Sequences are padded up to MAX_SEQS rows. The attention kernel's grid is sized for the most tiles a
  token count can need (prefill_tiles); the spare tiles point at an extra, empty sequence (no queries, no
  context) and return at once.
- Logits are computed for MAX_SEQS rows (padded with row 0); the caller gets the real ones.
Steps with more sequences or tokens, or extra logits rows (prompt logprobs), run eagerly.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from worker.engine.attention_backends import PrefillMetadata
from worker.engine.step_inputs import StepPlan

# Sequences one graphed step may carry: a new prompt or two next to a few decoding streams (low load, where
# time to first token is what a user notices). Busier steps carry enough tokens to keep the GPU ahead of the
# host anyway.
MAX_SEQS = 16

ForwardFn = Callable[[torch.Tensor, torch.Tensor, PrefillMetadata, torch.Tensor], torch.Tensor]


def token_ladder(max_tokens: int) -> list[int]:
    """Padded token counts with a graph each, up to max_tokens (itself included)."""
    sizes = [16, *range(32, 513, 32), *range(576, 1025, 64)]
    sizes = [s for s in sizes if s < max_tokens]
    return [*sizes, max_tokens] if max_tokens > 0 else []


class PrefillGraphs:
    def __init__(
        self,
        forward: ForwardFn,
        max_tokens: int,
        block_size: int,
        max_blocks_per_seq: int,
        block_m: int,
        null_slot: int,
        device: torch.device,
    ) -> None:
        """forward(ids, positions, metadata, sample rows) -> float32 logits of those rows. block_m: the
        attention kernel's query rows per tile (prefill_block_m). null_slot: a KV slot nobody reads."""
        from worker.engine.triton_attention import prefill_tiles  # Triton is imported only where it runs

        self._prefill_tiles = prefill_tiles
        self.forward = forward
        self.sizes = token_ladder(max_tokens)
        self.block_size = block_size
        self.block_m = block_m
        self.null_slot = null_slot
        self.device = device
        tokens, seqs = self.sizes[-1], MAX_SEQS
        max_tiles = self.max_tiles(tokens)
        # Two buffers, one copy each per step: int64 [ids | positions | slots | sample rows], and int32
        # [query starts | query lens | context lens | tile seq | tile row | block tables]; the attention
        # rows have one more, empty sequence for the spare tiles.
        self.longs = torch.zeros(3 * tokens + seqs, dtype=torch.long, device=device)
        self.ints = torch.zeros(3 * (seqs + 1) + 2 * max_tiles + (seqs + 1) * max_blocks_per_seq,
                                dtype=torch.int32, device=device)  # fmt: skip
        pin = device.type == "cuda"
        self.host_longs = torch.zeros(self.longs.shape, dtype=torch.long, pin_memory=pin)
        self.host_ints = torch.zeros(self.ints.shape, dtype=torch.int32, pin_memory=pin)
        self._longs = _split(self.longs, [tokens, tokens, tokens, seqs])
        self._ints = _split(self.ints, [seqs + 1] * 3 + [max_tiles] * 2 + [(seqs + 1) * max_blocks_per_seq])
        self._ints[-1] = self._ints[-1].view(seqs + 1, max_blocks_per_seq)
        # The host buffers are rewritten by the next step: not before this step's copies have run.
        self._copied: torch.cuda.Event | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def max_tiles(self, tokens: int) -> int:
        """The most attention tiles `tokens` tokens of up to MAX_SEQS sequences make: each sequence adds at
        most one partial tile."""
        return -(-tokens // self.block_m) + MAX_SEQS

    def fits(self, plan: StepPlan) -> bool:
        return plan.num_seqs <= MAX_SEQS and len(plan.input_ids) <= self.max_tokens

    def size_for(self, plan: StepPlan) -> int:
        return self.size_for_tokens(len(plan.input_ids))

    def size_for_tokens(self, tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, tokens)]

    def metadata(self, size: int) -> PrefillMetadata:
        starts, lens, context, tile_seq, tile_row, tables = self._ints
        tiles = self.max_tiles(size)
        return PrefillMetadata(
            slots=self._longs[2][:size], block_tables=tables, tile_seq=tile_seq[:tiles], tile_row=tile_row[:tiles],
            query_starts=starts, query_lens=lens, context_lens=context,
        )  # fmt: skip

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, PrefillMetadata, torch.Tensor]:
        ids, positions, _slots, sample = self._longs
        return ids[:size], positions[:size], self.metadata(size), sample

    def load(self, plan: StepPlan, size: int) -> None:
        """Write `plan`, padded to `size` tokens and MAX_SEQS sequences, into the static buffers."""
        if self._copied is not None:
            self._copied.synchronize()
        n, tokens = plan.num_seqs, len(plan.input_ids)
        # numpy views of the host buffers: filling them from lists is several times cheaper than torch.
        ids, positions, slots, sample = _split(self.host_longs.numpy(), [self.max_tokens] * 3 + [MAX_SEQS])
        ids[:tokens], ids[tokens:size] = plan.input_ids, 0
        positions[:tokens], positions[tokens:size] = plan.positions, 0
        slots[:tokens], slots[tokens:size] = plan.slots, self.null_slot
        k = len(plan.sample_indices)
        sample[:k], sample[k:] = plan.sample_indices, 0
        tiles = self.max_tiles(size)
        sections = [MAX_SEQS + 1] * 3 + [self.max_tiles(self.max_tokens)] * 2
        starts, lens, context, tile_seq, tile_row, tables = _split(self.host_ints.numpy(), [*sections, -1])
        tables = tables.reshape(MAX_SEQS + 1, -1)
        starts[:n], starts[n:] = plan.query_starts, 0
        lens[:n], lens[n:] = plan.query_lens, 0  # row MAX_SEQS: the empty sequence of the spare tiles
        context[:n], context[n:] = plan.context_lens, 0
        real_seq, real_row = self._prefill_tiles(plan.query_lens, self.block_m)
        m = len(real_seq)
        tile_seq[:m], tile_seq[m:tiles] = real_seq, MAX_SEQS
        tile_row[:m], tile_row[m:tiles] = real_row, 0
        for i, (table, ctx) in enumerate(zip(plan.block_tables, plan.context_lens, strict=True)):
            used = -(-ctx // self.block_size)
            tables[i, :used] = table[:used]
        self.longs.copy_(self.host_longs, non_blocking=True)
        self.ints.copy_(self.host_ints, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def capture(self) -> None:
        """Capture largest first, all graphs sharing one memory pool (they never run at the same time)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                inputs = self._inputs(size)
                self.forward(*inputs)  # compiles kernels for this shape, warms the allocator
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self.forward(*inputs)
                self.graphs[size] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def run(self, plan: StepPlan) -> torch.Tensor:
        """The step's float32 logits [len(plan.sample_indices), vocab] (a view): the graph of the smallest
        size that fits, or, before capture (CPU tests), the same padded step run eagerly."""
        size = self.size_for(plan)
        self.load(plan, size)
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self.forward(*self._inputs(size))
        return logits[: len(plan.sample_indices)]


def _split(buffer, sizes: list[int]) -> list:
    """Consecutive slices of a flat buffer (a tensor or an array); -1: the rest."""
    parts, start = [], 0
    for size in sizes:
        end = len(buffer) if size < 0 else start + size
        parts.append(buffer[start:end])
        start = end
    return parts
