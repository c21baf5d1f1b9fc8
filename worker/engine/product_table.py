"""Which matrix products of a captured step go through our Triton kernels, and which through cuBLAS.

At 1 row (a decode step of one sequence) the GEMV (triton_gemv.py), at 2-32 rows (decode batches of that
many) the skinny product (triton_skinny.py): each where a timing at start-up, on the card in use, finds it
faster than F.linear for that weight shape and row count. Everything else, and every product outside a CUDA
graph capture, stays with cuBLAS: launched from Python a Triton kernel costs ~20 µs of host time against
cuBLAS's few, which an eager step would pay 129 times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.engine.triton_gemv import gemv, time_products
from worker.engine.triton_skinny import ROWS, skinny_linear

Shape = tuple[int, int]  # (N, K) of a weight


class ProductTable:
    def __init__(self, gemv_shapes: set[Shape], skinny: dict[Shape, set[int]] | None = None) -> None:
        self.gemv_shapes = gemv_shapes
        self.skinny = skinny or {}  # weight shape -> the row counts the skinny product takes

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.is_contiguous() and torch.cuda.is_current_stream_capturing():
            rows, shape = x.shape[0], (weight.shape[0], weight.shape[1])
            if rows == 1 and shape in self.gemv_shapes:
                return gemv(x, weight)
            if rows in self.skinny.get(shape, ()):
                return skinny_linear(x, weight)
        return F.linear(x, weight)

    @classmethod
    def build(
        cls, weights: list[torch.Tensor], with_gemv: bool = True, skinny_rows: tuple[int, ...] = ROWS
    ) -> tuple[ProductTable, dict[str, dict[str, float]]]:
        """Time our kernels against F.linear on each distinct weight shape (all weights of that shape, in a
        CUDA graph, so that they come from HBM as in a step); keep ours where faster. Returns the table and
        the timings (ms per pass over all weights of a shape) for the log."""
        if not weights or weights[0].dtype not in (torch.bfloat16, torch.float16):
            return cls(set()), {}  # float32 runs keep cuBLAS's arithmetic (the parity checks rely on it)
        by_shape: dict[Shape, list[torch.Tensor]] = {}
        for w in weights:
            by_shape.setdefault((w.shape[0], w.shape[1]), []).append(w)
        gemv_shapes: set[Shape] = set()
        skinny: dict[Shape, set[int]] = {}
        timings: dict[str, dict[str, float]] = {}
        for (n, k), group in by_shape.items():
            row = timings.setdefault(f"{n}x{k}", {})
            for rows in ((1,) if with_gemv else ()) + tuple(skinny_rows):
                x = torch.randn(rows, k, dtype=group[0].dtype, device=group[0].device)
                ours = time_products(gemv if rows == 1 else skinny_linear, x, group)
                theirs = time_products(F.linear, x, group)
                row[f"m{rows}_ours_ms"], row[f"m{rows}_cublas_ms"] = round(ours, 4), round(theirs, 4)
                if ours < theirs and rows == 1:
                    gemv_shapes.add((n, k))
                elif ours < theirs:
                    skinny.setdefault((n, k), set()).add(rows)
        return cls(gemv_shapes, skinny), timings
