"""Triton kernels for attention over the paged KV cache (the GPU path; attention.py is the torch one).

Cache layout (both paths): per layer K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's token t lives in block block_tables[seq, t // block_size], row t % block_size.

- write_kv:          one launch stores the new tokens' K and V into their slots.
- decode_attention:  one query token per sequence (the CUDA-graph path). Memory bound: every step streams
                     each sequence's whole context. The context is split over `num_splits` programs per
                     (sequence, KV head) when there are too few sequences to fill the GPU (flash-decoding);
                     a second small kernel merges the partial softmaxes.
Prefill attention (packed variable-length queries) is in triton_prefill.py.

All of them take plain tensors and read lengths from device memory, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# -- write K/V ----------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    K, V, KCache, VCache, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(Slots + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_KV_HEADS
    k = tl.load(K + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(V + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(KCache + slot * stride_cs + heads * stride_ch + dims, k, mask=mask)
    tl.store(VCache + slot * stride_cs + heads * stride_ch + dims, v, mask=mask)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]; slots: [num_tokens] flat slot index."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kc = k_cache.view(-1, num_kv_heads, head_dim)
    vc = v_cache.view(-1, num_kv_heads, head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, kc, vc, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
    )  # fmt: skip


@triton.jit
def _rotary_write_kv_kernel(
    Q, K, V, Cos, Sin, KCache, VCache, Slots,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + token).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(Cos + token * stride_ct + d)  # transformers' cos/sin repeat their first half
    sin = tl.load(Sin + token * stride_ct + d)
    dt = Q.dtype.element_ty
    # q * cos + rotate_half(q) * sin, rotate_half(q) = (-x2, x1); each product rounded as torch rounds it.
    qh = tl.arange(0, Q_HEADS_PAD)[:, None]
    qmask = qh < NUM_HEADS
    qbase = Q + token * stride_qt + qh * stride_qh
    x1 = tl.load(qbase + d, mask=qmask, other=0.0)
    x2 = tl.load(qbase + HALF + d, mask=qmask, other=0.0)
    tl.store(qbase + d, ((x1 * cos).to(dt) + (-x2 * sin).to(dt)).to(dt), mask=qmask)
    tl.store(qbase + HALF + d, ((x2 * cos).to(dt) + (x1 * sin).to(dt)).to(dt), mask=qmask)
    kh = tl.arange(0, KV_HEADS_PAD)[:, None]
    kmask = kh < NUM_KV_HEADS
    kbase = K + token * stride_kt + kh * stride_kh
    x1 = tl.load(kbase + d, mask=kmask, other=0.0)
    x2 = tl.load(kbase + HALF + d, mask=kmask, other=0.0)
    cbase = slot * stride_cs + kh * stride_ch
    tl.store(KCache + cbase + d, ((x1 * cos).to(dt) + (-x2 * sin).to(dt)).to(dt), mask=kmask)
    tl.store(KCache + cbase + HALF + d, ((x2 * cos).to(dt) + (x1 * sin).to(dt)).to(dt), mask=kmask)
    vbase = V + token * stride_vt + kh * stride_vh
    tl.store(VCache + cbase + d, tl.load(vbase + d, mask=kmask), mask=kmask)
    tl.store(VCache + cbase + HALF + d, tl.load(vbase + HALF + d, mask=kmask), mask=kmask)


def rotary_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
) -> None:  # fmt: skip
    """Rotary embedding applied to q (in place) and k, and the rotated k with v stored in their slots: one
    launch instead of three. q, k, v: [num_tokens, heads, head_dim], last dim contiguous."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    kc = k_cache.view(-1, num_kv_heads, head_dim)
    vc = v_cache.view(-1, num_kv_heads, head_dim)
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, kc, vc, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1),
        NUM_HEADS=num_heads, Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2,
    )  # fmt: skip


# -- decode -------------------------------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    Q, KCache, VCache, BlockTables, ContextLens,
    Out, PartialAcc, PartialMax, PartialSum,
    scale,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(ContextLens + seq)
    # This program's share of the context, in whole tiles.
    num_tiles = tl.cdiv(context_len, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + g
    acc, m_i, l_i = _attend_one_query(
        Q + seq * stride_qt, KCache, VCache, BlockTables + seq * stride_bt, context_len, kv_head, tile_start, tile_end,
        scale, stride_qh, stride_cb, stride_ct, stride_ch, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, PRECISION,
    )  # fmt: skip
    group_mask = (g < GROUP)[:, None]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(Out + seq * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=group_mask)  # fmt: skip
    else:
        # Partials laid out [seq, head, split, ...]; an empty split leaves max -inf and sum 0.
        row = (seq * (tl.num_programs(1) * GROUP) + head) * NUM_SPLITS + split
        tl.store(PartialAcc + row[:, None] * HEAD_DIM + d[None, :], acc, mask=group_mask)
        tl.store(PartialMax + row, m_i, mask=g < GROUP)
        tl.store(PartialSum + row, l_i, mask=g < GROUP)


@triton.jit
def _attend_one_query(
    QRow, KCache, VCache, TableRow, context_len, kv_head, tile_start, tile_end,
    scale, stride_qh, stride_cb, stride_ct, stride_ch,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One token's query heads of `kv_head` against its keys in tiles [tile_start, tile_end): the unnormalized
    output, running max and sum (online softmax, log2 units). QRow / TableRow: the token's q row and its
    sequence's block table row."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + g
    q = tl.load(QRow + head[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(KCache.dtype.element_ty)  # exp2 below

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    offs = tl.arange(0, TILE)
    for tile in range(tile_start, tile_end):
        tokens = tile * TILE + offs
        valid = tokens < context_len
        blocks = tl.load(TableRow + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_offsets = blocks * stride_cb + (tokens % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        k = tl.load(KCache + kv_offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if GROUP_PAD == 1:
            scores = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
        else:
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(VCache + kv_offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if GROUP_PAD == 1:
            acc = acc * alpha[:, None] + tl.sum(p.reshape(TILE, 1) * v.to(tl.float32), axis=0)[None, :]
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _merge_splits_kernel(
    Out, PartialAcc, PartialMax, PartialSum, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (seq * NUM_HEADS + head) * NUM_SPLITS
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    m = tl.load(PartialMax + row0 + s)
    total_max = tl.max(m, axis=0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - total_max))  # maxima are in log2 units
    denom = tl.sum(tl.load(PartialSum + row0 + s) * weight, axis=0)
    acc = tl.load(PartialAcc + (row0 + s)[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / denom
    tl.store(Out + seq * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty))


# Tokens per loop iteration and warps per program of the decode kernel (tuned on H100 by
# benchmarks/kernels.py; see docs/BENCHMARKS.md).
DECODE_TILE = 128
DECODE_WARPS = 4


class DecodeWorkspace:
    """Scratch for split partials, allocated once per (max batch, splits) so graph replays reuse it."""

    def __init__(self, max_seqs: int, num_heads: int, head_dim: int, max_splits: int, device: torch.device) -> None:
        rows = max_seqs * num_heads * max_splits
        self.acc = torch.empty(rows, head_dim, dtype=torch.float32, device=device)
        self.max = torch.empty(rows, dtype=torch.float32, device=device)
        self.sum = torch.empty(rows, dtype=torch.float32, device=device)


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Split the context until there are about two programs per SM (a power of two, at most max_splits)."""
    splits = 1
    while splits < max_splits and num_seqs * num_kv_heads * splits < 2 * num_sms:
        splits *= 2
    return splits


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    workspace: DecodeWorkspace | None = None,
    out: torch.Tensor | None = None,
    tile: int = DECODE_TILE,
    num_warps: int = DECODE_WARPS,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] (one token per sequence) -> same shape.
    block_tables: [num_seqs, max_blocks] int32; context_lens: [num_seqs] int32 (including the new token)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    if num_splits > 1 and workspace is None:
        workspace = DecodeWorkspace(num_seqs, num_heads, head_dim, num_splits, q.device)
    dummy = out  # unused pointer arguments when there is a single split
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out,
        workspace.acc if num_splits > 1 else dummy,
        workspace.max if num_splits > 1 else dummy,
        workspace.sum if num_splits > 1 else dummy,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=_group_pad(group),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE=max(block_size, tile), PRECISION=dot_precision(q),
        num_warps=num_warps,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, workspace.acc, workspace.max, workspace.sum, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_DIM=head_dim,
        )  # fmt: skip
    return out


def dot_precision(x: torch.Tensor) -> str:
    """float32 inputs get full-precision dots (tf32 would blur the float32 parity checks); bf16/fp16 are
    exact inputs to the tensor cores anyway."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _group_pad(group: int) -> int:
    """Query heads per KV head, padded for the kernel: 1 stays 1 (vector path), else >= 16 for tl.dot."""
    return 1 if group == 1 else max(16, triton.next_power_of_2(group))
