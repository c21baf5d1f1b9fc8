"""The Triton attention kernels against a float64 reference, on random inputs of many shapes (block
boundaries, lengths of 1, GQA and MHA). On a machine without a GPU they run in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

# Without a GPU, tests/conftest.py has switched Triton to its interpreter.
triton = pytest.importorskip("triton")
from worker.engine import triton_attention as ta  # noqa: E402
from worker.engine import triton_prefill as tp  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 on GPU (the serving dtype); the interpreter runs numpy, which has no bf16.
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOLERANCE = 1e-2 if DTYPE is torch.bfloat16 else 1e-4


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


def random_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, dtype=DTYPE, device=DEVICE), torch.randn(shape, dtype=DTYPE, device=DEVICE)


def random_block_tables(context_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    """Each sequence gets distinct, shuffled physical blocks (paging must not assume contiguity)."""
    width = max(-(-n // block_size) for n in context_lens)
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(context_lens):
        k = -(-n // block_size)
        tables[i, :k] = perm[used : used + k]
        used += k
    return tables.to(DEVICE)


def reference(q, k_cache, v_cache, tables, context_lens, query_lens, scale) -> torch.Tensor:
    """float64 attention, sequence by sequence: query j of a sequence sees keys 0..(cached + j)."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    start = 0
    for i, (ctx, n) in enumerate(zip(context_lens, query_lens, strict=True)):
        blocks = tables[i, : -(-ctx // block_size)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, k_cache.shape[3])[:ctx].double()
        v = v_cache[blocks].reshape(-1, kv_heads, v_cache.shape[3])[:ctx].double()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        qi = q[start : start + n].double()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        visible = torch.arange(ctx, device=q.device)[None, :] <= (ctx - n + torch.arange(n, device=q.device))[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[start : start + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += n
    return out


def packed_step(cases: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int):
    """A step's packed inputs for (cached tokens, new tokens) per sequence: context and query lengths, where
    each sequence's queries start, random q, a random paged cache and shuffled block tables."""
    context_lens = [c + n for c, n in cases]
    query_lens = [n for _, n in cases]
    k_cache, v_cache = random_cache(128, block_size, kv_heads, head_dim)
    tables = random_block_tables(context_lens, block_size, 128)
    q = torch.randn(sum(query_lens), heads, head_dim, dtype=DTYPE, device=DEVICE)
    starts = [sum(query_lens[:i]) for i in range(len(cases))]
    return context_lens, query_lens, starts, q, k_cache, v_cache, tables


SHAPES = [  # (heads, kv_heads, head_dim, block_size)
    (4, 4, 32, 16),  # MHA, like Code Llama 7B
    (8, 2, 32, 16),  # GQA, like the 34B
    (2, 1, 64, 8),
]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_matches_reference(heads, kv_heads, head_dim, block_size, num_splits):
    torch.manual_seed(heads * 7 + num_splits)
    context_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 77]
    k_cache, v_cache = random_cache(64, block_size, kv_heads, head_dim)
    tables = random_block_tables(context_lens, block_size, 64)
    q = torch.randn(len(context_lens), heads, head_dim, dtype=DTYPE, device=DEVICE)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    ta.decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits, out=out)
    ref = reference(q, k_cache, v_cache, tables, context_lens, [1] * len(context_lens), scale)
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES)
def test_prefill_attention_matches_reference(heads, kv_heads, head_dim, block_size):
    torch.manual_seed(heads)
    # (cached tokens, new tokens): fresh prompts, chunks after a cached prefix, single decode tokens,
    # and lengths on and around block and tile boundaries.
    cases = [(0, 1), (0, 70), (block_size, 1), (5, block_size), (40, 65), (0, 2 * block_size + 1)]
    context_lens, query_lens, starts, q, k_cache, v_cache, tables = packed_step(
        cases, heads, kv_heads, head_dim, block_size
    )
    tile_seq, tile_row = tp.prefill_tiles(query_lens, tp.prefill_block_m(DTYPE))

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    scale = head_dim**-0.5
    ref = reference(q, k_cache, v_cache, tables, context_lens, query_lens, scale)
    # One program per tile; then a fixed grid of fewer programs than tiles, with spare entries past the
    # count in the tile arrays (how a CUDA graph runs it: prefill_graphs.py).
    spare = [len(cases) - 1] * 5
    for persistent in ({}, {"num_tiles": i32([len(tile_seq)]), "programs": max(1, len(tile_seq) // 3)}):
        seqs, rows = (tile_seq + spare, tile_row + [0] * 5) if persistent else (tile_seq, tile_row)
        out = torch.full_like(q, float("nan"))
        tp.prefill_attention(
            q, k_cache, v_cache, tables, i32(seqs), i32(rows), i32(starts), i32(query_lens), i32(context_lens),
            scale, out=out, **persistent,
        )  # fmt: skip
        assert relative_error(out, ref) < TOLERANCE, persistent


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES)
def test_a_mixed_step_split_between_prefill_tiles_and_single_queries_matches_reference(
    heads, kv_heads, head_dim, block_size
):
    """A mixed step as the backends run it (split_tiles): prompt chunks through prefill_attention, the sequences
    with one new token (decodes, a prompt's last token after a cached prefix) through single_query_attention,
    both into one output; one program per item, then fixed grids with spare entries past the counts (CUDA
    graphs). Every row must be written, by exactly the right kernel."""
    torch.manual_seed(heads + 100)
    cases = [(77, 1), (0, 70), (block_size, 1), (40, 65), (3 * block_size - 1, 1), (0, 1), (5, block_size)]
    context_lens, query_lens, starts, q, k_cache, v_cache, tables = packed_step(
        cases, heads, kv_heads, head_dim, block_size
    )
    tile_seq, tile_row, singles = tp.split_tiles(query_lens, tp.prefill_block_m(DTYPE))
    assert singles == [0, 2, 4, 5]

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    scale = head_dim**-0.5
    ref = reference(q, k_cache, v_cache, tables, context_lens, query_lens, scale)
    per_seq = (i32(starts), i32(query_lens), i32(context_lens))
    for persistent in (False, True):
        out = torch.full_like(q, float("nan"))
        if persistent:
            tiles = {"num_tiles": i32([len(tile_seq)]), "programs": 2}
            tp.prefill_attention(
                q, k_cache, v_cache, tables, i32(tile_seq + [1] * 3), i32(tile_row + [0] * 3), *per_seq, scale,
                out=out, **tiles,
            )  # fmt: skip
            tp.single_query_attention(
                q, k_cache, v_cache, tables, i32(singles + [1] * 3), per_seq[0], per_seq[2], scale, out,
                num_singles=i32([len(singles)]), programs=3,
            )  # fmt: skip
        else:
            tp.prefill_attention(q, k_cache, v_cache, tables, i32(tile_seq), i32(tile_row), *per_seq, scale, out=out)
            tp.single_query_attention(q, k_cache, v_cache, tables, i32(singles), per_seq[0], per_seq[2], scale, out)
        assert relative_error(out, ref) < TOLERANCE, persistent


@pytest.mark.parametrize("kv_heads", [1, 2, 5])
def test_write_kv_stores_each_token_in_its_slot(kv_heads):
    k_cache, v_cache = random_cache(8, 4, kv_heads, 16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([0, 5, 31, 6], device=DEVICE)
    k = torch.randn(4, kv_heads, 16, dtype=DTYPE, device=DEVICE)
    v = torch.randn(4, kv_heads, 16, dtype=DTYPE, device=DEVICE)
    ta.write_kv(k_cache, v_cache, k, v, slots)
    flat_k, flat_v = k_cache.view(-1, kv_heads, 16), v_cache.view(-1, kv_heads, 16)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(32, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, kv_heads, 16)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, kv_heads, 16)[untouched])


def test_decode_splits_fill_the_gpu_for_small_batches():
    assert ta.decode_splits(1, 32, 132) == 16
    assert ta.decode_splits(256, 32, 132) == 1
    assert ta.decode_splits(4, 32, 132) == 4


def test_fused_elementwise_kernels_match_transformers_modules():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from worker.engine import triton_ops

    torch.manual_seed(0)
    hidden = 96  # not a power of two: the masked tail is exercised
    x = torch.randn(5, hidden, dtype=DTYPE, device=DEVICE)
    residual = torch.randn(5, hidden, dtype=DTYPE, device=DEVICE)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(DEVICE, DTYPE)
    norm.weight.data.uniform_(0.5, 1.5)
    out, new_residual = triton_ops.add_rms_norm(x, norm.weight, 1e-5, residual)
    assert torch.equal(new_residual, residual + x)
    assert relative_error(out, norm(residual + x).double()) < TOLERANCE / 10
    out, same = triton_ops.add_rms_norm(x, norm.weight, 1e-5)
    assert same is x and relative_error(out, norm(x).double()) < TOLERANCE / 10

    gate_up = torch.randn(4, 2 * 40, dtype=DTYPE, device=DEVICE)
    expected = torch.nn.functional.silu(gate_up[:, :40]) * gate_up[:, 40:]
    assert relative_error(triton_ops.silu_mul(gate_up), expected.double()) < TOLERANCE / 10


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_rotary_write_kv_rotates_q_in_place_and_stores_rotated_k_and_v(heads, kv_heads):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(heads)
    k_cache, v_cache = random_cache(8, 4, kv_heads, 32)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * 32, dtype=DTYPE, device=DEVICE)  # strided views, as in the model
    q = qkv[:, : heads * 32].view(5, heads, 32)
    k = qkv[:, heads * 32 : (heads + kv_heads) * 32].view(5, kv_heads, 32)
    v = qkv[:, (heads + kv_heads) * 32 :].view(5, kv_heads, 32)
    angles = torch.randn(5, 16, device=DEVICE)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DTYPE), torch.cat([angles.sin()] * 2, -1).to(DTYPE)
    ref_q, ref_k = apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin, unsqueeze_dim=1)
    slots = torch.tensor([3, 0, 17, 31, 8], device=DEVICE)
    ta.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    # bf16 on GPU: within rounding of transformers (the compiler may keep a product unrounded before the add).
    tolerance = 4e-3 if DTYPE is torch.bfloat16 else 1e-6
    assert relative_error(q, ref_q.double()) < tolerance
    assert relative_error(k_cache.view(-1, kv_heads, 32)[slots], ref_k.double()) < tolerance
    assert torch.equal(v_cache.view(-1, kv_heads, 32)[slots], v)


@pytest.mark.parametrize(
    ("n", "k", "tile"),
    [
        (64, 256, (4, 128, 4, 2)),  # every tile full
        (40, 300, (8, 128, 4, 2)),  # rows and columns past the last full tile (masked)
        (48, 96, (16, 256, 4, 1)),  # one partial column tile
        (7, 128, (1, 128, 2, 1)),  # one row per program
    ],
)
def test_gemv_matches_reference(n, k, tile):
    from worker.engine import triton_gemv as tg

    weight = torch.randn(n, k, dtype=DTYPE, device=DEVICE)
    x = torch.randn(1, k, dtype=DTYPE, device=DEVICE)
    out = tg.gemv(x, weight, tg.Tile(*tile))
    assert out.shape == (1, n) and out.dtype == DTYPE
    assert relative_error(out, x.double() @ weight.double().T) < TOLERANCE


@pytest.mark.parametrize(
    ("m", "n", "k", "tile"),
    [
        (2, 64, 256, (16, 128, 4, 2)),  # every tile full
        (3, 40, 300, (16, 128, 4, 2)),  # rows and columns past the last full tile (masked)
        (16, 48, 96, (32, 64, 4, 1)),  # a whole 16-row tile of x
        (20, 33, 128, (16, 64, 4, 2)),  # more rows than 16 (a 32-row tile), one weight row past a tile
    ],
)
def test_skinny_product_matches_reference(m, n, k, tile):
    from worker.engine.triton_gemv import Tile
    from worker.engine.triton_skinny import skinny_linear

    weight = torch.randn(n, k, dtype=DTYPE, device=DEVICE)
    x = torch.randn(m, k, dtype=DTYPE, device=DEVICE)
    out = skinny_linear(x, weight, Tile(*tile))
    assert out.shape == (m, n) and out.dtype == DTYPE
    assert relative_error(out, x.double() @ weight.double().T) < TOLERANCE


def test_product_table_keeps_cublas_outside_a_graph_capture_and_for_other_shapes():
    from worker.engine.product_table import ProductTable

    table = ProductTable({(8, 64)}, {(8, 64): {2}})
    weight = torch.randn(8, 64, dtype=DTYPE, device=DEVICE)
    other = torch.randn(16, 64, dtype=DTYPE, device=DEVICE)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 64, dtype=DTYPE, device=DEVICE)
        # Eager (not capturing) and a shape not in the table both go to F.linear: bit-identical to it.
        assert torch.equal(table.linear(x, weight), torch.nn.functional.linear(x, weight))
        assert torch.equal(table.linear(x, other), torch.nn.functional.linear(x, other))
