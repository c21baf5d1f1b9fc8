"""An experiment, not used by the service: a Triton product for 2-64 rows against cuBLAS, per weight shape.

`python -m benchmarks.skinny` (run 30) found cuBLAS 0.7-1.1 ms above the weights' read floor for a whole
step's products at 2-128 rows (decode batches of 2-64 sequences, short prefills), where the batch-1 GEMV
(worker/engine/triton_gemv.py) takes the same gap back at one row. This kernel streams each weight tile
once for all the step's rows: a program owns BLOCK_N weight rows and every row of x (padded to BLOCK_M,
16 at least: the tensor-core product's smallest tile), walks K in BLOCK_K tiles with several loads in
flight, and accumulates in float32 through tl.dot.

The benchmark times, for each M and each of Code Llama 7B's weight shapes, every tile of a small grid over
all 32 layers' weights of that shape (one CUDA graph, so that weights come from HBM as in a step), checks
each against F.linear, and prints the best tile's time beside cuBLAS's, then a whole step's sum.

    python -m benchmarks.skinny_gemm [--rows 2,4,8,16,32,64] [--layers 32]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from worker.engine.triton_gemv import Tile


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


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tile: Tile) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N] for M <= 64, accumulated in float32, rounded to x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= 64 and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, tile.block_n),)](
        x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=k % tile.block_k == 0, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return y


GRID = [
    Tile(block_n, block_k, warps, stages)
    for block_n, block_k, warps, stages in itertools.product((16, 32, 64), (128, 256), (4,), (3, 5))
] + [Tile(32, 512, 8, 3), Tile(64, 256, 8, 4)]


def main() -> None:
    from benchmarks.gemv import SHAPES
    from worker.engine.triton_gemv import time_products

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2,4,8,16,32,64", type=lambda s: [int(m) for m in s.split(",")])
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    per_step = {"qkv": args.layers, "o": args.layers, "gate_up": args.layers, "down": args.layers, "lm_head": 1}
    weights = {
        name: [torch.randn(*SHAPES[name], dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(count)]
        for name, count in per_step.items()
    }
    print(f"{torch.cuda.get_device_name()}, {args.layers} layers; ms per pass over all weights of a shape")
    print(f"{'M':>3} {'shape':>8} {'cuBLAS':>8} {'best':>8}  tile (block_n, block_k, warps, stages)  max rel err")
    totals = {}
    for m in args.rows:
        step_cublas = step_best = 0.0
        for name, group in weights.items():
            x = torch.randn(m, group[0].shape[1], dtype=torch.bfloat16, device="cuda")
            want = F.linear(x, group[0]).float()
            theirs = time_products(F.linear, x, group)
            best, best_tile, best_err = float("inf"), None, 0.0
            for tile in GRID:
                try:
                    got = skinny_linear(x, group[0], tile).float()
                except triton.runtime.errors.OutOfResources:  # (64 rows with deep pipelines: shared memory)
                    continue
                err = ((got - want).abs().max() / want.abs().max()).item()
                if err > 2e-2:
                    print(f"    {name} M={m} {tile}: wrong (max rel err {err:.3g}), skipped")
                    continue
                ms = time_products(skinny_linear, x, group, tile=tile)
                if ms < best:
                    best, best_tile, best_err = ms, tile, err
            step_cublas += theirs
            step_best += min(best, theirs)
            t = best_tile
            tile_text = f"({t.block_n}, {t.block_k}, {t.num_warps}, {t.num_stages})" if t else "none fits"
            print(f"{m:>3} {name:>8} {theirs:>8.3f} {best:>8.3f}  {tile_text:<38} {best_err:.2g}")
        totals[m] = (step_cublas, step_best)
    print(f"\n{'M':>3} {'step, cuBLAS':>13} {'step, best of both':>19}")
    for m, (theirs, ours) in totals.items():
        print(f"{m:>3} {theirs:>13.3f} {ours:>19.3f}  ({theirs - ours:+.3f} ms)")


if __name__ == "__main__":
    main()
