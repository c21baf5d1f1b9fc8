"""Matrix-vector product for one-token decode steps: y = x @ W.T with x of one row.

At batch 1 a decode step is nothing but reading the weights once (13.5 GB for Code Llama 7B), so its time
is the weight bytes over the bandwidth the matrix-vector kernels reach. On an H100 (benchmarks/gemv.py,
2026-11-26) cuBLAS reads Code Llama 7B's weights at 2.18-2.72 TB/s depending on the shape (2.63 over a
whole step), against 3.02 TB/s for a plain read of the same memory; this kernel gets 2.68-3.10 (2.97 over
a step: 5.03 -> 4.45 ms). Each program streams one weight row (or a few) in long column tiles with wide
loads, several in flight (num_stages), keeps a float32 accumulator per element of the tile and reduces it
once at the end, so the loop body is loads and FMAs.

Each weight shape gets the tile that benchmarks/gemv.py found fastest on the H100 (TILES); a shape not
listed takes DEFAULT_TILE. `ProductTable.build` (product_table.py) checks at start-up, on the card in use,
that the kernel beats F.linear for each shape of the model, and keeps F.linear where it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Tile:
    block_n: int  # weight rows per program
    block_k: int  # columns per loop iteration
    num_warps: int
    num_stages: int


DEFAULT_TILE = Tile(1, 1024, 8, 4)
# (N, K) -> the best tile benchmarks/gemv.py measured on an H100 (Code Llama 7B's shapes, 2026-11-26; one
# row per program and long column tiles won everywhere). Fusing SiLU*up into the down product as a prologue
# was tried and is slower: with one row per program every program recomputes it over all 11,008 columns.
TILES: dict[tuple[int, int], Tile] = {
    (12288, 4096): Tile(1, 2048, 8, 4),  # q/k/v
    (4096, 4096): Tile(1, 2048, 8, 2),  # o
    (22016, 4096): Tile(1, 2048, 8, 4),  # gate/up
    (4096, 11008): Tile(1, 1024, 4, 2),  # down
    (32016, 4096): Tile(1, 2048, 8, 4),  # lm_head
}


@triton.jit
def _gemv_kernel(
    X, W, Y, N, K, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if not EVEN_N:
        rows = tl.minimum(rows, N - 1)  # the rows past N re-read row N-1; their sums are not stored
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    full = K - K % BLOCK_K
    for k in range(0, full, BLOCK_K):  # whole tiles: no masks in the hot loop
        x = tl.load(X + k + cols).to(tl.float32)
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
    if full < K:  # the last, partial tile
        x = tl.load(X + full + cols, mask=full + cols < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=(full + cols < K)[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1).to(Y.dtype.element_ty)
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(Y + out_rows, y, mask=out_rows < N)


def gemv(x: torch.Tensor, weight: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N], accumulated in float32 and rounded to x's dtype as F.linear."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.is_contiguous() and weight.stride(1) == 1
    tile = tile or TILES.get((n, k), DEFAULT_TILE)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
        x, weight, y, n, k, weight.stride(0),
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, EVEN_N=n % tile.block_n == 0,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return y


def time_graph(fn: Callable[[], object], replays: int = 20) -> float:
    """Milliseconds per call of `fn` captured in a CUDA graph (launch overhead excluded), median of 5."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[2]


def time_products(product: Callable[..., torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor], **kw) -> float:
    """Milliseconds for product(x, w, **kw) over all `weights` in one CUDA graph: as in a step, each weight
    comes from HBM (one 4096x4096 bf16 weight, 32 MB, would otherwise sit in the 50 MB L2)."""
    return time_graph(lambda: [product(x, w, **kw) for w in weights])
