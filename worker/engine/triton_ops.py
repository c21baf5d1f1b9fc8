"""Fused elementwise kernels for the GPU forward pass.

Between its matrix products, a Llama layer in plain torch is some thirty small kernels (RMSNorm alone is
six: upcast, square, mean, rsqrt, scale, weight). At decode batch sizes each is a few microseconds of
almost no work, and together they cost as much as the layer's weight reads. These kernels do each group
in one pass, rounding where transformers rounds (bf16 after each torch op), so results match the torch
path up to the order of the sums inside a row.

- add_rms_norm: residual add (optional) + RMSNorm, one row per program;
- silu_mul: SiLU(gate) * up from the fused gate/up projection.

(Rotary is fused with the K/V store: triton_attention.rotary_write_kv.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    X, Residual, Weight, Out, ResidualOut, eps,
    stride_x, stride_r, stride_o, stride_ro,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # hidden = residual + hidden, rounded to the activation dtype as torch does.
        x = (x + tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)).to(X.dtype.element_ty)
        tl.store(ResidualOut + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / N
    normed = (xf * tl.rsqrt(variance + eps)).to(X.dtype.element_ty)
    w = tl.load(Weight + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + cols, out, mask=mask)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual) * weight, x + residual); without a residual, (rms_norm(x) * weight, x)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, residual_out, eps,
            x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0), residual_out.stride(0),
            N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None,
            num_warps=8 if n >= 4096 else 4,
        )  # fmt: skip
    return out, residual_out


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_g + N + cols, mask=mask, other=0.0)
    dt = Out.dtype.element_ty
    activated = (gate * tl.sigmoid(gate)).to(dt)
    tl.store(Out + row * stride_o + cols, (activated.to(tl.float32) * up.to(tl.float32)).to(dt), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [rows, 2 * n] (gate then up) -> silu(gate) * up, [rows, n]."""
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        grid = (rows, triton.cdiv(n, block))
        _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), N=n, BLOCK=block)
    return out
