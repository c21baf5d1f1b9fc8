"""Matrix products for a few rows (2-32: decode batches of that many sequences): y = x @ W.T.

Like the batch-1 GEMV (triton_gemv.py), such a product is a read of every weight, and cuBLAS reads them
slower than the card can: a whole step's products at 2-16 rows took 5.06-5.11 ms on an H100 against a read
floor of 4.38 (`python -m benchmarks.skinny_gemm`, run 39, 2026-11-26). This kernel streams each weight tile
once for all the step's rows: a program owns BLOCK_N weight rows and every row of x (padded to BLOCK_M, 16 at
least: the tensor-core product's smallest tile), walks K in BLOCK_K tiles with several loads in flight, and
accumulates in float32 through tl.dot. Per shape it beat cuBLAS on q/k/v, o, gate/up and lm_head by 0.01-0.18
ms per pass over 32 layers, and lost on down (K = 11,008: only 128 programs on 132 SMs); the start-up timing
(product_table.ProductTable.build) keeps cuBLAS wherever it is faster on the card in use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.triton_gemv import Tile

# The decode graphs' batch sizes it is timed for (cuda_graphs.batch_size_ladder); at 24 and 32 rows it won
# only on some shapes in run 39, which the start-up timing sorts out.
ROWS = (2, 4, 8, 16, 24, 32)
DEFAULT_TILE = Tile(32, 256, 4, 5)
# (N, K) -> the best tile of benchmarks/skinny_gemm.py's grid on an H100 at 2-16 rows (run 39).
TILES: dict[tuple[int, int], Tile] = {
    (12288, 4096): Tile(32, 128, 4, 5),  # q/k/v
    (4096, 4096): Tile(32, 256, 4, 5),  # o
    (22016, 4096): Tile(64, 128, 4, 3),  # gate/up
    (4096, 11008): Tile(32, 256, 4, 5),  # down
    (32016, 4096): Tile(32, 256, 4, 5),  # lm_head
}


@triton.jit
def _skinny_kernel(
    X, W, Y, M, N, K, stride_x, stride_w, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = tl.minimum(rn, N - 1)  # rows past N re-read row N-1; their sums are not stored
    x_ptrs = X + rm[:, None] * stride_x + rk[None, :]
    w_ptrs = W + w_rows[:, None].to(tl.int64) * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            in_k = k + rk < K
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0, eviction_policy="evict_first")
        acc += tl.dot(x, tl.trans(w))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = Y + rm[:, None] * stride_y + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N] for M <= 64, accumulated in float32, rounded to x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    tile = tile or TILES.get((n, k), DEFAULT_TILE)
    assert m <= 64 and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, tile.block_n),)](
        x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=k % tile.block_k == 0, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return y
