"""Triton prefill attention over the paged KV cache (decode attention and the K/V store: triton_attention.py).

prefill_attention: packed variable-length queries (prefill chunks) attending causally to their cached
prefix and to themselves. Compute bound: tiles of queries x tiles of keys through tl.dot, online softmax
(flash attention). One program per (query tile, head), or, for CUDA graphs, a fixed grid whose programs
share out the tiles (persistent mode).

single_query_attention: the sequences of a mixed step that bring one new token (the decodes beside a prompt
chunk). In a prefill tile such a token fills one of BLOCK_M query rows, one program of 8 warps streams its
whole context, and a few such programs fit an SM: at 25 decodes of 750 tokens beside a 384-token chunk the
step's attention took 5.9 ms against 4.3 + 0.5 ms for the decode kernel and the chunk alone
(benchmarks/mixed_step.py, H100). They take the decode kernel's loop instead: one small program per
(token, KV head), or a fixed grid sharing them out for CUDA graphs.

Cache layout as in triton_attention.py; lengths are read from device memory, so it can be captured in CUDA
graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.triton_attention import DECODE_TILE, DECODE_WARPS, _attend_one_query, _group_pad, dot_precision


@triton.jit
def _prefill_kernel(
    Q, KCache, VCache, BlockTables, Out,
    TileSeq, TileRow, QueryStarts, QueryLens, ContextLens, NumTiles,
    scale,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """One program per (tile, head); PERSISTENT: a fixed grid whose programs take tiles pid, pid + grid, ...
    up to the count in NumTiles (device memory), so that a CUDA graph serves any number of tiles."""
    head = tl.program_id(1)
    if PERSISTENT:
        for tile in range(tl.program_id(0), tl.load(NumTiles), tl.num_programs(0)):
            _prefill_tile(
                Q, KCache, VCache, BlockTables, Out, TileSeq, TileRow, QueryStarts, QueryLens, ContextLens, scale,
                stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
                tile, head, GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, PRECISION,
            )  # fmt: skip
    else:
        _prefill_tile(
            Q, KCache, VCache, BlockTables, Out, TileSeq, TileRow, QueryStarts, QueryLens, ContextLens, scale,
            stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
            tl.program_id(0), head, GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, PRECISION,
        )  # fmt: skip


@triton.jit
def _prefill_tile(
    Q, KCache, VCache, BlockTables, Out,
    TileSeq, TileRow, QueryStarts, QueryLens, ContextLens,
    scale,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    tile, head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    kv_head = head // GROUP
    seq = tl.load(TileSeq + tile)
    row0 = tl.load(TileRow + tile)  # first query of this tile, within the sequence's new tokens
    q_start = tl.load(QueryStarts + seq)
    q_len = tl.load(QueryLens + seq)
    context_len = tl.load(ContextLens + seq)
    cached = context_len - q_len  # tokens before the new ones

    rows = row0 + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    positions = cached + rows  # each query sees keys 0..its position
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_valid[:, None], other=0.0)  # fmt: skip
    # exp2 instead of exp: fold log2(e) into the scale once.
    q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(KCache.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    # Keys before the tile's first position are visible to every row: no causal mask for those tiles.
    unmasked_end = ((cached + row0 + 1) // BLOCK_N) * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        tokens = start + offs
        blocks = tl.load(BlockTables + seq * stride_bt + tokens // BLOCK_SIZE).to(tl.int64)
        kv_offsets = blocks * stride_cb + (tokens % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        k = tl.load(KCache + kv_offsets[:, None] + d[None, :])
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(VCache + kv_offsets[:, None] + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    last_key = tl.minimum(cached + row0 + BLOCK_M, context_len)  # keys this tile can see at all
    for start in range(unmasked_end, last_key, BLOCK_N):
        tokens = start + offs
        valid = tokens < last_key
        blocks = tl.load(BlockTables + seq * stride_bt + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_offsets = blocks * stride_cb + (tokens % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        k = tl.load(KCache + kv_offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = valid[None, :] & (tokens[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows with nothing visible yet (padding rows) keep m = -inf: guard the exp against nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(VCache + kv_offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_valid[:, None])  # fmt: skip


@triton.jit
def _single_query_kernel(
    Q, KCache, VCache, BlockTables, Out,
    Singles, QueryStarts, ContextLens, NumSingles,
    scale,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """One program per (single, KV head); PERSISTENT: a fixed grid whose programs take items pid, pid + grid,
    ... of singles x KV heads, up to the count in NumSingles (device memory)."""
    if PERSISTENT:
        for item in range(tl.program_id(0), tl.load(NumSingles) * NUM_KV_HEADS, tl.num_programs(0)):
            _single_query(
                Q, KCache, VCache, BlockTables, Out, Singles, QueryStarts, ContextLens, scale,
                stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
                item // NUM_KV_HEADS, item % NUM_KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, PRECISION,
            )  # fmt: skip
    else:
        _single_query(
            Q, KCache, VCache, BlockTables, Out, Singles, QueryStarts, ContextLens, scale,
            stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
            tl.program_id(0), tl.program_id(1), GROUP, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, PRECISION,
        )  # fmt: skip


@triton.jit
def _single_query(
    Q, KCache, VCache, BlockTables, Out, Singles, QueryStarts, ContextLens, scale,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
    index, kv_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.load(Singles + index)
    row = tl.load(QueryStarts + seq).to(tl.int64)
    context_len = tl.load(ContextLens + seq)  # its one token sees the whole context, itself included
    acc, _max, l_i = _attend_one_query(
        Q + row * stride_qt, KCache, VCache, BlockTables + seq * stride_bt, context_len, kv_head, 0,
        tl.cdiv(context_len, TILE), scale, stride_qh, stride_cb, stride_ct, stride_ch,
        GROUP, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, PRECISION,
    )  # fmt: skip
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + g
    out = acc / l_i[:, None]
    tl.store(Out + row * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=(g < GROUP)[:, None])  # fmt: skip


def single_query_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    singles: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_singles: torch.Tensor | None = None,
    programs: int = 0,
) -> torch.Tensor:
    """Attention of the sequences listed in `singles` (int32 indices into the per-sequence tensors, as for
    prefill_attention), each with one new token, written into their rows of `out`. One program per (sequence,
    KV head), or with num_singles (int32 [1] on the device: how many entries of `singles` are real)
    `programs` programs sharing them out (CUDA graphs)."""
    _num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    persistent = num_singles is not None
    _single_query_kernel[(programs,) if persistent else (singles.numel(), num_kv_heads)](
        q, k_cache, v_cache, block_tables, out,
        singles, query_starts, context_lens, num_singles if persistent else singles,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=_group_pad(group), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=max(block_size, DECODE_TILE), PRECISION=dot_precision(q), PERSISTENT=persistent,
        num_warps=DECODE_WARPS,
    )  # fmt: skip
    return out


def prefill_tiles(query_lens: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """Map each program to (sequence, first query row): one program per block_m new tokens of a sequence."""
    tile_seq, tile_row = [], []
    for i, n in enumerate(query_lens):
        for row in range(0, n, block_m):
            tile_seq.append(i)
            tile_row.append(row)
    return tile_seq, tile_row


def split_tiles(query_lens: list[int], block_m: int) -> tuple[list[int], list[int], list[int]]:
    """A step's attention work: prefill tiles of the sequences with several new tokens, and the sequences with
    one (for single_query_attention)."""
    tile_seq, tile_row = prefill_tiles([0 if n == 1 else n for n in query_lens], block_m)
    return tile_seq, tile_row, [i for i, n in enumerate(query_lens) if n == 1]


PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 128
PREFILL_WARPS = 8
PREFILL_STAGES = 3


def prefill_block_m(dtype: torch.dtype) -> int:
    """Query rows per program: float32 tiles take twice the shared memory, so they get half the rows."""
    return 64 if dtype == torch.float32 else PREFILL_BLOCK_M


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_row: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = PREFILL_WARPS,
    num_stages: int | None = None,
    num_tiles: torch.Tensor | None = None,
    programs: int = 0,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] packed new tokens -> same shape. Per-sequence int32 tensors:
    query_starts/query_lens (where its new tokens sit in q), context_lens (cached + new); tile_seq/tile_row
    from prefill_tiles(query_lens, block_m), block_m defaulting to prefill_block_m(q.dtype). One program per
    tile, or with num_tiles (int32 [1] on the device: how many of tile_seq's entries are real) `programs`
    programs per head that share the tiles out (CUDA graphs: a grid fixed whatever the step)."""
    fp32 = q.dtype == torch.float32
    block_m = block_m or prefill_block_m(q.dtype)
    block_n = block_n or (32 if fp32 else PREFILL_BLOCK_N)
    num_stages = num_stages or (2 if fp32 else PREFILL_STAGES)
    _num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    persistent = num_tiles is not None
    _prefill_kernel[(programs if persistent else tile_seq.numel(), num_heads)](
        q, k_cache, v_cache, block_tables, out,
        tile_seq, tile_row, query_starts, query_lens, context_lens, num_tiles if persistent else tile_seq,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q), PERSISTENT=persistent,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
