"""Batch-1 decode's matrix-vector products on the GPU: cuBLAS (F.linear, default and cuBLASLt) against
worker/engine/triton_gemv.py's kernel over a sweep of tiles, on Code Llama 7B's weight shapes.

    python -m benchmarks.gemv [--out DIR] [--layers 32]

Each shape is timed over all its `--layers` distinct weights inside one CUDA graph, so every weight comes
from HBM as in a real step (one 4096x4096 bf16 weight is 32 MB and would otherwise sit in the 50 MB L2).
Prints achieved read bandwidth per shape next to the card's read and copy bandwidth, the best tile per
shape (to paste into triton_gemv.TILES), and the whole step's products in both versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from worker.engine import triton_gemv as tg

HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32016
SHAPES = {  # name -> (N, K), Code Llama 7B with fused q/k/v and gate/up as the engine runs it
    "qkv": (3 * HIDDEN, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
    "lm_head": (VOCAB, HIDDEN),
}
TILES = [
    tg.Tile(bn, bk, warps, stages)
    for bn, bk in [(1, 512), (1, 1024), (1, 2048), (1, 4096), (2, 1024), (2, 2048), (4, 512), (4, 1024)]
    for warps in (4, 8, 16)
    for stages in (2, 4)
]  # fmt: skip


def read_bandwidth() -> tuple[float, float]:
    """(read-only, copy) bytes per second over a 2 GiB tensor: a sum, and a copy (read + written)."""
    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    read_ms = tg.time_graph(lambda: src.sum(dtype=torch.float32), replays=10)
    copy_ms = tg.time_graph(lambda: dst.copy_(src), replays=10)
    return src.numel() * 2 / (read_ms / 1e3), 2 * src.numel() * 2 / (copy_ms / 1e3)


def check(weight: torch.Tensor, x: torch.Tensor, tile: tg.Tile) -> float:
    ref = (x.double() @ weight.double().T).float()
    got = tg.gemv(x, weight, tile).float()
    return ((got - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    read_bw, copy_bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read {read_bw / 1e9:,.0f} GB/s, copy {copy_bw / 1e9:,.0f} GB/s")
    weights = {
        name: [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
               for _ in range(1 if name == "lm_head" else args.layers)]
        for name, (n, k) in SHAPES.items()
    }  # fmt: skip
    results: dict[str, dict] = {}
    print(f"{'shape':<9}{'N x K':>14}{'cuBLAS':>9}{'cuBLASLt':>10}{'Triton':>9}  best tile (bn, bk, warps, stages) err")
    for name, group in weights.items():
        n, k = SHAPES[name]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        nbytes = sum(w.numel() * 2 for w in group)
        cublas = tg.time_products(F.linear, x, group)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        cublaslt = tg.time_products(F.linear, x, group)
        torch.backends.cuda.preferred_blas_library("cublas")
        sweep = []
        for tile in TILES:
            try:
                sweep.append((tg.time_products(tg.gemv, x, group, tile=tile), tile))
            except Exception as e:  # a tile the compiler refuses (too many registers / shared memory)
                print(f"  {name} {tile}: {type(e).__name__}")
        sweep.sort(key=lambda t: t[0])
        best_ms, best = sweep[0]
        err = check(group[0], x, best)
        results[name] = {
            "n": n, "k": k, "weights": len(group), "bytes": nbytes,
            "cublas_ms": cublas, "cublaslt_ms": cublaslt, "triton_ms": best_ms, "tile": best.__dict__,
            "rel_err": err, "top5": [{"ms": ms, "tile": t.__dict__} for ms, t in sweep[:5]],
        }  # fmt: skip
        gbs = [nbytes / ms / 1e6 for ms in (cublas, cublaslt, best_ms)]
        print(f"{name:<9}{f'{n} x {k}':>14}{gbs[0]:>9,.0f}{gbs[1]:>10,.0f}{gbs[2]:>9,.0f}  "
              f"{(best.block_n, best.block_k, best.num_warps, best.num_stages)!s:<33}{err:.1e}")  # fmt: skip

    # The whole step's products in layer order, each version with its best choice per shape.
    order = [w for i in range(args.layers) for w in (weights["qkv"][i], weights["o"][i], weights["gate_up"][i],
                                                     weights["down"][i])] + weights["lm_head"]  # fmt: skip
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for k in (HIDDEN, INTERMEDIATE)}
    tiles = {SHAPES[name]: tg.Tile(**r["tile"]) for name, r in results.items()}
    step_cublas = tg.time_graph(lambda: [F.linear(xs[w.shape[1]], w) for w in order], replays=10)
    step_triton = tg.time_graph(lambda: [tg.gemv(xs[w.shape[1]], w, tiles[tuple(w.shape)]) for w in order], replays=10)
    step_bytes = sum(w.numel() * 2 for w in order)
    print(f"whole step ({step_bytes / 1e9:.2f} GB): cuBLAS {step_cublas:.3f} ms "
          f"({step_bytes / step_cublas / 1e6:,.0f} GB/s), "
          f"Triton {step_triton:.3f} ms ({step_bytes / step_triton / 1e6:,.0f} GB/s); floor at read bandwidth "
          f"{step_bytes / read_bw * 1e3:.3f} ms")  # fmt: skip
    print("TILES = {" + ", ".join(f"{SHAPES[n]}: tg.Tile{tuple(r['tile'].values())}" for n, r in results.items()) + "}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "card": torch.cuda.get_device_name(), "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "read_bandwidth": read_bw, "copy_bandwidth": copy_bw, "shapes": results,
        "step": {"bytes": step_bytes, "cublas_ms": step_cublas, "triton_ms": step_triton},
    }  # fmt: skip
    path = out / f"gemv-{now:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
