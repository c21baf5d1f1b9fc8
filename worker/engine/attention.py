"""Attention over the paged KV cache: the plain torch path (CPU, and GPU until the Triton kernels).

Layout: one K and one V tensor per layer, [num_blocks, block_size, num_kv_heads, head_dim]. A token at
position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.

Each step attends a packed batch: for every sequence, its new tokens (a prefill chunk, or one decode
token) at positions [num_computed, num_computed + n) attend causally to everything cached before them and
to themselves. The new K/V are written into the cache first, so the cache alone holds the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    # [num_tokens] cache slot of each new token.
    slot_mapping: torch.Tensor
    # Per sequence, on the host: where its new tokens start in the packed batch, how many there are,
    # and its context length (cached + new) after this step.
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    # Per sequence, the physical blocks covering its context.
    block_tables: list[torch.Tensor]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store new keys/values ([num_tokens, num_kv_heads, head_dim]) into their cache slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    for start, q_len, ctx_len, blocks in zip(
        meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables, strict=True
    ):
        k = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:ctx_len]
        v = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:ctx_len]
        q_i = q[start : start + q_len]
        mask = None
        if q_len > 1:
            # Query j sits at position ctx_len - q_len + j and sees keys 0..that position.
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q_i.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
    return out
