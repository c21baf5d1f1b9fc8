"""Attention backends: turn a StepPlan into device metadata, then attend layer by layer.

- TorchBackend: the plain torch path (CPU, tests), one SDPA call per sequence.
- TritonBackend: the GPU path. Eager steps (prefill, mixed) use the varlen prefill kernel for prompt chunks
  and the single-query kernel for the sequences with one new token beside them; pure decode steps use the
  decode kernel through fixed-size static buffers, so that they can be captured as CUDA graphs (see
  cuda_graphs.py).

A backend's `attend(layer, q, k, v, meta)` writes the new K/V into the layer's cache and returns the
attention output for the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine import attention as torch_attention
from worker.engine.step_inputs import CopyFence, StepPlan, write_block_tables

# Eager steps' block tables are this many entries wide, or a multiple of it (TritonBackend.prepare).
TABLE_WIDTH_MULTIPLE = 16


def _device_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class TorchBackend:
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], scale: float) -> None:
        self.k_caches, self.v_caches, self.scale = k_caches, v_caches, scale

    def prepare(self, plan: StepPlan, device: torch.device) -> torch_attention.AttentionMetadata:
        block_size = self.k_caches[0].shape[1]
        return torch_attention.AttentionMetadata(
            slot_mapping=_device_tensor(plan.slots, torch.long, device),
            query_starts=plan.query_starts,
            query_lens=plan.query_lens,
            context_lens=plan.context_lens,
            block_tables=[
                _device_tensor(t[: -(-n // block_size)], torch.long, device)
                for t, n in zip(plan.block_tables, plan.context_lens, strict=True)
            ],
        )

    def attend(self, layer: int, q, k, v, meta: torch_attention.AttentionMetadata, rotary=None) -> torch.Tensor:
        assert rotary is None, "the torch path rotates q and k itself"
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        torch_attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return torch_attention.paged_attention(q, k_cache, v_cache, meta, self.scale)


@dataclass
class PrefillMetadata:
    slots: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    tile_seq: torch.Tensor
    tile_row: torch.Tensor
    query_starts: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    # Sequences with one new token (decodes beside prompt chunks): single_query_attention's, not in the tiles.
    singles: torch.Tensor | None = None
    # A graphed step's: the real tile and single counts on the device, and the fixed numbers of programs
    # sharing them out.
    num_tiles: torch.Tensor | None = None
    programs: int = 0
    num_singles: torch.Tensor | None = None
    single_programs: int = 0


@dataclass
class DecodeMetadata:
    """Views of the static buffers for a (padded) decode batch; see TritonBackend.decode_buffers."""

    slots: torch.Tensor  # [batch] int64
    block_tables: torch.Tensor  # [batch, max_blocks_per_seq] int32
    context_lens: torch.Tensor  # [batch] int32
    num_splits: int


class TritonBackend:
    # Block 0 of the pool is never handed to a sequence: padded rows of a graph batch read and write it.
    NULL_BLOCK = 0

    def __init__(
        self,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        scale: float,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        num_heads: int,
    ) -> None:
        from worker.engine import triton_attention, triton_prefill

        self.ops = triton_attention
        self.prefill_ops = triton_prefill
        self.k_caches, self.v_caches, self.scale = k_caches, v_caches, scale
        device = k_caches[0].device
        self.device = device
        self.num_kv_heads = k_caches[0].shape[2]
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self.max_splits = 16
        head_dim = k_caches[0].shape[3]
        self.workspace = triton_attention.DecodeWorkspace(max_num_seqs, num_heads, head_dim, self.max_splits, device)
        # Static decode inputs, written before each graph replay (and by eager decodes alike).
        self.slots = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_num_seqs, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.host_slots = torch.zeros(max_num_seqs, dtype=torch.long, pin_memory=pin)
        self.host_block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self.host_context_lens = torch.ones(max_num_seqs, dtype=torch.int32, pin_memory=pin)
        self._fence = CopyFence(device)

    # -- eager (prefill and mixed) steps ------------------------------------------------------------------

    def prepare(self, plan: StepPlan, device: torch.device) -> PrefillMetadata:
        block_size = self.k_caches[0].shape[1]
        # The tables' row stride is a kernel argument, and Triton compiles a variant of a kernel per class of
        # integer argument (1, a multiple of 16, other): a width that follows the step's longest context would
        # compile new variants in the middle of serving (0.6-1.6 s each on a cold cache, benchmarks/
        # jit_compiles.py). Rounded up to a multiple of 16, every eager step takes the one variant that the
        # start-up warm-up compiles.
        blocks = max(-(-n // block_size) for n in plan.context_lens)
        width = -(-blocks // TABLE_WIDTH_MULTIPLE) * TABLE_WIDTH_MULTIPLE
        tables = torch.zeros(plan.num_seqs, width, dtype=torch.int32)
        write_block_tables(tables.numpy(), plan, block_size)
        block_m = self.prefill_ops.prefill_block_m(self.k_caches[0].dtype)
        tile_seq, tile_row, singles = self.prefill_ops.split_tiles(plan.query_lens, block_m)
        i32 = torch.int32
        return PrefillMetadata(
            slots=_device_tensor(plan.slots, torch.long, device),
            block_tables=(tables.pin_memory() if device.type == "cuda" else tables).to(device, non_blocking=True),
            tile_seq=_device_tensor(tile_seq, i32, device),
            tile_row=_device_tensor(tile_row, i32, device),
            query_starts=_device_tensor(plan.query_starts, i32, device),
            query_lens=_device_tensor(plan.query_lens, i32, device),
            context_lens=_device_tensor(plan.context_lens, i32, device),
            singles=_device_tensor(singles, i32, device) if singles else None,
        )

    # -- decode steps (static buffers) --------------------------------------------------------------------

    def decode_metadata(self, batch: int) -> DecodeMetadata:
        """Views of the static buffers for a batch of `batch` rows (a graph's size)."""
        return DecodeMetadata(
            slots=self.slots[:batch],
            block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch],
            num_splits=self.ops.decode_splits(batch, self.num_kv_heads, self.num_sms, self.max_splits),
        )

    def load_decode(self, plan: StepPlan, batch: int) -> None:
        """Copy a decode plan into the static buffers; rows past the plan (graph padding) use the null block."""
        n = plan.num_seqs
        block_size = self.k_caches[0].shape[1]
        self._fence.wait()
        # numpy views of the pinned host buffers: filling them from lists is several times cheaper than torch.
        slots, lens, tables = self.host_slots.numpy(), self.host_context_lens.numpy(), self.host_block_tables.numpy()
        slots[:n] = plan.slots
        slots[n:batch] = self.NULL_BLOCK * block_size
        lens[:n] = plan.context_lens
        lens[n:batch] = 1
        width = write_block_tables(tables, plan, block_size)
        tables[n:batch, 0] = self.NULL_BLOCK
        self.slots[:batch].copy_(self.host_slots[:batch], non_blocking=True)
        self.context_lens[:batch].copy_(self.host_context_lens[:batch], non_blocking=True)
        self.block_tables[:batch, :width].copy_(self.host_block_tables[:batch, :width], non_blocking=True)
        self._fence.mark()

    # -- the layer ----------------------------------------------------------------------------------------

    def attend(self, layer: int, q, k, v, meta: PrefillMetadata | DecodeMetadata, rotary=None) -> torch.Tensor:
        """With rotary=(cos, sin), q and k are not rotated yet: rotation and the K/V store are one kernel."""
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        if rotary is None:
            self.ops.write_kv(k_cache, v_cache, k, v, meta.slots)
        else:
            self.ops.rotary_write_kv(q, k, v, *rotary, k_cache, v_cache, meta.slots)
        if isinstance(meta, DecodeMetadata):
            return self.ops.decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale, meta.num_splits,
                self.workspace,
            )  # fmt: skip
        out = torch.empty_like(q)
        if meta.num_tiles is not None or meta.tile_seq.numel():
            self.prefill_ops.prefill_attention(
                q, k_cache, v_cache, meta.block_tables, meta.tile_seq, meta.tile_row, meta.query_starts,
                meta.query_lens, meta.context_lens, self.scale, out=out, num_tiles=meta.num_tiles,
                programs=meta.programs,
            )  # fmt: skip
        if meta.singles is not None:
            self.prefill_ops.single_query_attention(
                q, k_cache, v_cache, meta.block_tables, meta.singles, meta.query_starts, meta.context_lens,
                self.scale, out, num_singles=meta.num_singles, programs=meta.single_programs,
            )  # fmt: skip
        return out
