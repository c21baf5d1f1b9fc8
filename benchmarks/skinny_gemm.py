"""worker/engine/triton_skinny.py's product for 2-64 rows against cuBLAS, per weight shape and tile.

`python -m benchmarks.skinny` (run 30) found cuBLAS 0.7-1.1 ms above the weights' read floor for a whole
step's products at 2-128 rows (decode batches of 2-64 sequences, short prefills), where the batch-1 GEMV
(worker/engine/triton_gemv.py) takes the same gap back at one row. The kernel (triton_skinny.py) streams
each weight tile once for all the step's rows. This benchmark chose its tiles (triton_skinny.TILES).

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

from worker.engine.triton_gemv import Tile
from worker.engine.triton_skinny import skinny_linear

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
