"""The Llama forward pass over a packed batch, on transformers' weights and modules.

Two versions of the same computation:
- `TorchLlama` calls transformers' own modules (norms, projections, MLP) around our paged attention: the
  CPU path, exactly transformers' arithmetic, which the parity tests rely on.
- `FusedLlama` (GPU) runs the same weights through fewer, larger kernels: q/k/v as one matrix product
  and gate/up as another (the transformers modules keep working on views of the fused weights), residual
  add + RMSNorm and SiLU*up each in one Triton kernel (triton_ops.py), rotary fused with the K/V store
  (triton_attention.py). At 1-32 rows the captured steps' matrix products may go through our Triton
  kernels instead of cuBLAS (`use_product_table`: the model runner times both on the card at start-up).

Both take (input_ids, positions, attention metadata, rows to sample) and return float32 logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# attend(layer_index, q, k, v, rotary) -> attention output for the new tokens; it also stores k and v.
# With rotary=(cos, sin) the backend applies the rotary embedding itself (fused with the K/V store).
Attend = Callable[..., torch.Tensor]


class TorchLlama:
    def __init__(self, model: PreTrainedModel, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.model, self.cos, self.sin = model, cos, sin
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, sample_indices: torch.Tensor | None
    ) -> torch.Tensor:
        llama = self.model.model
        hidden = llama.embed_tokens(input_ids)
        cos, sin = self.cos[positions], self.sin[positions]
        n = hidden.shape[0]
        for i, layer in enumerate(llama.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            hidden = hidden + attn.o_proj(attend(i, q, k, v).reshape(n, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if sample_indices is not None:
            hidden = hidden[sample_indices]
        return self.model.lm_head(llama.norm(hidden)).float()


class FusedLlama:
    def __init__(self, model: PreTrainedModel, cos: torch.Tensor, sin: torch.Tensor) -> None:
        from worker.engine import triton_ops

        self.ops = triton_ops
        self.model, self.cos, self.sin = model, cos, sin
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_weights: list[torch.Tensor] = []
        self.gate_up_weights: list[torch.Tensor] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv_weights.append(_fuse(attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate_up_weights.append(_fuse(mlp.gate_proj, mlp.up_proj))
        self.linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear

    def weights(self) -> list[torch.Tensor]:
        """Every matrix the forward pass multiplies by, in the order of a step."""
        layers = self.model.model.layers
        per_layer = [
            (self.qkv_weights[i], layer.self_attn.o_proj.weight, self.gate_up_weights[i], layer.mlp.down_proj.weight)
            for i, layer in enumerate(layers)
        ]
        return [w for ws in per_layer for w in ws] + [self.model.lm_head.weight]

    def use_product_table(self, table) -> None:
        """Route the captured steps' products through `table.linear` (product_table.ProductTable)."""
        self.linear = table.linear

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, sample_indices: torch.Tensor | None
    ) -> torch.Tensor:
        ops, linear = self.ops, self.linear
        llama = self.model.model
        hidden = llama.embed_tokens(input_ids)
        residual = None
        cos, sin = self.cos[positions], self.sin[positions]
        n = hidden.shape[0]
        for i, layer in enumerate(llama.layers):
            x, residual = ops.add_rms_norm(hidden, layer.input_layernorm.weight, self.eps, residual)
            qkv = linear(x, self.qkv_weights[i])
            q = qkv[:, : self.q_size].view(n, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
            hidden = linear(attend(i, q, k, v, (cos, sin)).reshape(n, -1), layer.self_attn.o_proj.weight)
            x, residual = ops.add_rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps, residual)
            hidden = linear(ops.silu_mul(linear(x, self.gate_up_weights[i])), layer.mlp.down_proj.weight)
        if sample_indices is not None:
            hidden, residual = hidden[sample_indices], residual[sample_indices]
        x, _ = ops.add_rms_norm(hidden, llama.norm.weight, self.eps, residual)
        return linear(x, self.model.lm_head.weight).float()


def _fuse(*linears: torch.nn.Linear) -> torch.Tensor:
    """Concatenate the linears' weights (no biases in Llama) and point each module at its slice, so the
    model keeps working (and holds no second copy)."""
    assert all(lin.bias is None for lin in linears), "Llama projections have no bias"
    fused = torch.cat([lin.weight.data for lin in linears], dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused
