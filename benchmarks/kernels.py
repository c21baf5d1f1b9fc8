"""Attention kernel microbenchmarks on the GPU: correctness against float64, then the decode kernel's
achieved bandwidth and the prefill kernel's matrix rate for a few tile / warp choices.

    python -m benchmarks.kernels [--out DIR]

Decode is memory bound: its floor is the K and V bytes it must read over the HBM bandwidth measured here
(a device-to-device copy, bytes read + written). Prefill is compute bound: causal attention FLOPs over the
bf16 matrix rate measured here (8192^3 matmul).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
from pathlib import Path

import torch
import triton

from worker.engine import triton_attention as ta
from worker.engine import triton_prefill as tp

BLOCK_SIZE, HEADS, HEAD_DIM = 16, 32, 128  # Code Llama 7B


def measure_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device copy."""
    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 2 / (ms / 1e3)


def measure_matmul() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms / 1e3)


def paged_inputs(context_lens: list[int], query_lens: list[int]):
    blocks_needed = sum(-(-n // BLOCK_SIZE) for n in context_lens)
    num_blocks = blocks_needed + 1
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    width = max(-(-n // BLOCK_SIZE) for n in context_lens)
    perm = torch.randperm(num_blocks - 1) + 1
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(context_lens):
        k = -(-n // BLOCK_SIZE)
        tables[i, :k] = perm[used : used + k]
        used += k
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return q, k_cache, v_cache, tables.cuda()


def reference(q, k_cache, v_cache, tables, context_lens, query_lens) -> torch.Tensor:
    out, start = [], 0
    for i, (ctx, n) in enumerate(zip(context_lens, query_lens, strict=True)):
        blocks = tables[i, : -(-ctx // BLOCK_SIZE)].long()
        k = k_cache[blocks].reshape(-1, HEADS, HEAD_DIM)[:ctx].double()
        v = v_cache[blocks].reshape(-1, HEADS, HEAD_DIM)[:ctx].double()
        scores = torch.einsum("qhd,khd->hqk", q[start : start + n].double(), k) * HEAD_DIM**-0.5
        visible = torch.arange(ctx, device="cuda")[None] <= (ctx - n + torch.arange(n, device="cuda"))[:, None]
        out.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible[None], float("-inf")).softmax(-1), v))
        start += n
    return torch.cat(out)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def bench_decode(bandwidth: float, rows: list[dict]) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, ctx in [(1, 1024), (1, 8192), (32, 1024), (128, 800), (256, 700)]:
        lens = [ctx] * batch
        q, k_cache, v_cache, tables = paged_inputs(lens, [1] * batch)
        context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        splits = ta.decode_splits(batch, HEADS, sms)
        workspace = ta.DecodeWorkspace(batch, HEADS, HEAD_DIM, 16, q.device)
        ref = reference(q, k_cache, v_cache, tables, lens, [1] * batch) if batch <= 32 else None
        bytes_read = batch * ctx * HEADS * HEAD_DIM * 2 * 2
        args = (q, k_cache, v_cache, tables, context_lens, HEAD_DIM**-0.5, splits, workspace)
        for tile, warps in ((64, 4), (128, 4), (128, 8), (256, 8)):
            run = functools.partial(ta.decode_attention, *args, tile=tile, num_warps=warps)
            err = rel_error(run(), ref) if ref is not None else float("nan")
            ms = triton.testing.do_bench(run, warmup=20, rep=200, return_mode="median")
            row = {"kernel": "decode", "batch": batch, "ctx": ctx, "splits": splits, "tile": tile, "warps": warps}
            row |= {"ms": ms, "GB/s": bytes_read / ms / 1e6, "% of copy BW": 100 * bytes_read / (ms / 1e3) / bandwidth}
            rows.append(row | {"rel_err": err})
            print(json.dumps(rows[-1]), flush=True)


def bench_prefill(matmul: float, rows: list[dict]) -> None:
    cases = {
        "T1: 1x1024": ([1024], [1024]),
        "W1 chunk: 4x512": ([512] * 4, [512] * 4),
        "chunk after prefix: 2x(1536+512)": ([2048] * 2, [512] * 2),
    }
    for name, (ctx, qlen) in cases.items():
        q, k_cache, v_cache, tables = paged_inputs(ctx, qlen)
        starts = [sum(qlen[:i]) for i in range(len(qlen))]
        pairs = sum(sum(c - n + j + 1 for j in range(n)) for c, n in zip(ctx, qlen, strict=True))
        flops = 4 * HEADS * HEAD_DIM * pairs  # QK^T and PV over the visible (query, key) pairs
        ref = reference(q, k_cache, v_cache, tables, ctx, qlen)
        for block_m, block_n, warps, stages in ((64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3)):
            tile_seq, tile_row = tp.prefill_tiles(qlen, block_m)
            meta = [torch.tensor(v, dtype=torch.int32, device="cuda") for v in (tile_seq, tile_row, starts, qlen, ctx)]
            run = functools.partial(
                tp.prefill_attention, q, k_cache, v_cache, tables, *meta, HEAD_DIM**-0.5,
                block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            try:
                err = rel_error(run(), ref)
                ms = triton.testing.do_bench(run, warmup=20, rep=200, return_mode="median")
            except Exception as exc:
                print(f"skip {name} {block_m}x{block_n} w{warps} s{stages}: {exc!r:.120}", flush=True)
                continue
            row = {"kernel": "prefill", "case": name, "block_m": block_m, "block_n": block_n, "warps": warps}
            row |= {
                "stages": stages,
                "ms": ms,
                "TFLOP/s": flops / ms / 1e9,
                "% of matmul": 100 * flops / (ms / 1e3) / matmul,
            }
            rows.append(row | {"rel_err": err})
            print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    bandwidth, matmul = measure_bandwidth(), measure_matmul()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    rows: list[dict] = []
    bench_decode(bandwidth, rows)
    bench_prefill(matmul, rows)
    card = torch.cuda.get_device_name()
    result = {"card": card, "date": datetime.datetime.now(datetime.UTC).isoformat(), "torch": torch.__version__}
    result |= {"triton": triton.__version__, "copy_bandwidth_Bps": bandwidth, "matmul_flops": matmul, "rows": rows}
    path = Path(args.out) / f"kernels-{card.replace(' ', '_')}-{datetime.date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print("\nbest decode per shape (% of copy bandwidth):")
    for key in sorted({(r["batch"], r["ctx"]) for r in rows if r["kernel"] == "decode"}):
        shape = [r for r in rows if r["kernel"] == "decode" and (r["batch"], r["ctx"]) == key]
        best = max(shape, key=lambda r: r["GB/s"])
        print(
            f"  B={key[0]:4d} ctx={key[1]:5d}: {best['GB/s']:7.0f} GB/s ({best['% of copy BW']:.0f}%) "
            f"tile {best['tile']} warps {best['warps']} err {best['rel_err']:.1e}"
        )
    print("best prefill per case (% of matmul rate):")
    for case in dict.fromkeys(r["case"] for r in rows if r["kernel"] == "prefill"):
        best = max((r for r in rows if r.get("case") == case), key=lambda r: r["TFLOP/s"])
        print(
            f"  {case}: {best['TFLOP/s']:.0f} TFLOP/s ({best['% of matmul']:.0f}%) "
            f"{best['block_m']}x{best['block_n']} w{best['warps']} s{best['stages']} err {best['rel_err']:.1e}"
        )


if __name__ == "__main__":
    main()
