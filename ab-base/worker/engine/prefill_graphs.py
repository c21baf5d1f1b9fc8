"""Prefill and mixed steps as CUDA graphs, one per padded token count.

Why: an eager step launches about 300 kernels at about 30 µs of host time each, 9-10 ms whatever its
length, more in a worker whose other threads want the interpreter too. On an H100 the GPU needs 6.5 ms
for a 32-token prompt and 11.3 ms for a 512-token one (`python -m benchmarks.prefill_modes`): short prompts,
the usual ones of code completion, wait on the host, and so do the steps that carry a prompt chunk next to
running streams. Replayed as a graph, a step costs the GPU's time and one launch.

How: as for decode (cuda_graphs.py), inputs go through static buffers and the step is padded.
- Tokens are padded up to the next size of a ladder (16, multiples of 32 up to 512, of 64 up to 1,024: at
  most about 0.4 ms of wasted GPU time per step). Padding tokens sit at position 0, write their K/V into
  the null block and belong to no sequence, so no attention tile reads them; their rows compute garbage
  that nobody reads (rows never mix in a Llama layer outside attention).
- Attention runs on fixed grids whose programs share out however many prompt tiles and single-token
  sequences (decodes beside the chunks) the step has (the kernels' persistent mode; the counts are in
  device memory).
- Logits are computed for min(size, max_seqs) rows, padded with row 0; the caller gets the real ones.
Steps over the largest size, or with extra logits rows (prompt logprobs), run eagerly.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from worker.engine.attention_backends import PrefillMetadata
from worker.engine.cuda_graphs import Graphs, capture_ladder
from worker.engine.step_inputs import CopyFence, StepPlan, write_block_tables

# Programs per head beyond one per query tile of the padded size (tiles of prompts shorter than a tile).
SPARE_PROGRAMS = 16
# Most programs of the single-query kernel (one small program per (sequence, KV head) up to that): a graph
# replays them whether or not the step has such sequences, and those without work return at once.
MAX_SINGLE_PROGRAMS = 1024

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
        max_seqs: int,
        block_size: int,
        max_blocks_per_seq: int,
        block_m: int,
        null_slot: int,
        num_kv_heads: int,
        device: torch.device,
    ) -> None:
        """forward(ids, positions, metadata, sample rows) -> float32 logits of those rows. block_m: the
        attention kernel's query rows per tile (prefill_block_m). null_slot: a KV slot nobody reads."""
        from worker.engine.triton_prefill import split_tiles  # Triton is imported only where it runs

        self._split_tiles = split_tiles
        self.num_kv_heads = num_kv_heads
        self.forward = forward
        self.sizes = token_ladder(max_tokens)
        self.max_seqs = max_seqs
        self.block_size = block_size
        self.block_m = block_m
        self.null_slot = null_slot
        self.device = device
        tokens = self.sizes[-1]
        # Each sequence adds at most one partial tile.
        max_tiles = -(-tokens // block_m) + max_seqs
        # One copy per buffer and step: int64 [ids | positions | slots | sample rows]; int32 [query starts |
        # query lens | context lens | tile count | tile seq | tile row | single count | singles]; block tables
        # (the rows in use).
        self._long_sections = [tokens, tokens, tokens, max_seqs]
        self._int_sections = [max_seqs, max_seqs, max_seqs, 1, max_tiles, max_tiles, 1, max_seqs]
        pin = device.type == "cuda"
        self.longs = torch.zeros(sum(self._long_sections), dtype=torch.long, device=device)
        self.ints = torch.zeros(sum(self._int_sections), dtype=torch.int32, device=device)
        self.tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.host_longs = torch.zeros(self.longs.shape, dtype=torch.long, pin_memory=pin)
        self.host_ints = torch.zeros(self.ints.shape, dtype=torch.int32, pin_memory=pin)
        self.host_tables = torch.zeros(self.tables.shape, dtype=torch.int32, pin_memory=pin)
        self._fence = CopyFence(device)
        self.graphs: Graphs = {}

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def fits(self, plan: StepPlan) -> bool:
        return plan.num_seqs <= self.max_seqs and len(plan.input_ids) <= self.max_tokens

    def size_for(self, plan: StepPlan) -> int:
        return self.size_for_tokens(len(plan.input_ids))

    def size_for_tokens(self, tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, tokens)]

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, PrefillMetadata, torch.Tensor]:
        ids, positions, slots, sample = _split(self.longs, self._long_sections)
        starts, lens, context, num_tiles, tile_seq, tile_row, num_singles, singles = _split(
            self.ints, self._int_sections
        )
        meta = PrefillMetadata(
            slots=slots[:size], block_tables=self.tables, tile_seq=tile_seq, tile_row=tile_row,
            query_starts=starts, query_lens=lens, context_lens=context, singles=singles,
            num_tiles=num_tiles, programs=-(-size // self.block_m) + SPARE_PROGRAMS, num_singles=num_singles,
            single_programs=min(min(size, self.max_seqs) * self.num_kv_heads, MAX_SINGLE_PROGRAMS),
        )  # fmt: skip
        # A step has at most one sampled row per sequence, and no more sequences than tokens.
        return ids[:size], positions[:size], meta, sample[: min(size, self.max_seqs)]

    def load(self, plan: StepPlan, size: int) -> None:
        """Write `plan`, its tokens padded to `size`, into the static buffers."""
        self._fence.wait()
        n, tokens = plan.num_seqs, len(plan.input_ids)
        # numpy views of the host buffers: filling them from lists is several times cheaper than torch.
        ids, positions, slots, sample = _split(self.host_longs.numpy(), self._long_sections)
        ids[:tokens], ids[tokens:size] = plan.input_ids, 0
        positions[:tokens], positions[tokens:size] = plan.positions, 0
        slots[:tokens], slots[tokens:size] = plan.slots, self.null_slot
        k = len(plan.sample_indices)
        sample[:k], sample[k:] = plan.sample_indices, 0
        starts, lens, context, num_tiles, tile_seq, tile_row, num_singles, singles = _split(
            self.host_ints.numpy(), self._int_sections
        )
        starts[:n], lens[:n], context[:n] = plan.query_starts, plan.query_lens, plan.context_lens
        real_seq, real_row, real_singles = self._split_tiles(plan.query_lens, self.block_m)
        m, k = len(real_seq), len(real_singles)
        num_tiles[0], tile_seq[:m], tile_row[:m] = m, real_seq, real_row
        num_singles[0], singles[:k] = k, real_singles
        write_block_tables(self.host_tables.numpy(), plan, self.block_size)
        self.longs.copy_(self.host_longs, non_blocking=True)
        self.ints.copy_(self.host_ints, non_blocking=True)
        self.tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        self._fence.mark()

    def capture(self) -> None:
        self.graphs = capture_ladder(self.sizes, lambda size: self.forward(*self._inputs(size)))

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
    """Consecutive slices of a flat buffer (a tensor or an array)."""
    parts, start = [], 0
    for size in sizes:
        parts.append(buffer[start : start + size])
        start += size
    return parts
