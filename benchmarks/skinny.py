"""A whole step's matrix products at M rows (tokens in a prefill, sequences in a decode batch), cuBLAS
against its floor, on Code Llama 7B's weight shapes (GPU).

A step with few rows is a read of every weight (13.5 GB); with many, it is the products' arithmetic. This
prints, for M from 1 to 512, how long cuBLAS (F.linear, as the engine runs it outside the batch-1 GEMV)
takes for the step's products in layer order, inside one CUDA graph, against the larger of the two floors:
the weights over the card's read bandwidth, and the FLOPs over its measured bf16 matmul rate. Where cuBLAS
is far above the floor, a kernel made for that M has room (a diagnostic for the engine; nothing here is
used by the service).

    python -m benchmarks.skinny [--layers 32]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.gemv import HIDDEN, INTERMEDIATE, SHAPES, read_bandwidth
from worker.engine import triton_gemv as tg

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def matmul_rate() -> float:
    """bf16 FLOP/s of one big square product."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = tg.time_graph(lambda: a @ a, replays=10)
    return 2 * 8192**3 / (ms / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    read_bw, _ = read_bandwidth()
    flops = matmul_rate()
    print(f"{torch.cuda.get_device_name()}: read {read_bw / 1e9:,.0f} GB/s, matmul {flops / 1e12:,.0f} TFLOP/s")
    layer = [SHAPES["qkv"], SHAPES["o"], SHAPES["gate_up"], SHAPES["down"]]
    order = [
        torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(args.layers) for n, k in layer
    ]
    order.append(torch.randn(*SHAPES["lm_head"], dtype=torch.bfloat16, device="cuda") * 0.02)
    step_bytes = sum(w.numel() * 2 for w in order)
    step_params = sum(w.numel() for w in order)
    print(f"{'M':>5}{'cuBLAS ms':>11}{'GB/s':>8}{'TFLOP/s':>9}{'floor ms':>10}{'over floor':>12}")
    for m in ROWS:
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for k in (HIDDEN, INTERMEDIATE)}
        ms = tg.time_graph(lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in order], replays=10)
        floor_ms = max(step_bytes / read_bw, 2 * m * step_params / flops) * 1e3
        print(
            f"{m:>5}{ms:>11.3f}{step_bytes / ms / 1e6:>8,.0f}{2 * m * step_params / ms / 1e9:>9,.0f}"
            f"{floor_ms:>10.3f}{ms - floor_ms:>9.3f} ms"
        )


if __name__ == "__main__":
    main()
