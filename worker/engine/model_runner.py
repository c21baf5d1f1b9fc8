"""Runs the model over a packed batch of tokens with the KV cache in paged blocks.

Weights and module definitions come from transformers (a Llama checkpoint, which Code Llama is); the
forward pass is ours, so that every step sees one flat batch of tokens from many sequences, reads and
writes K/V through block tables, and computes logits only for the tokens that are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from worker.engine.attention import AttentionMetadata, paged_attention, write_kv
from worker.engine.config import EngineConfig
from worker.engine.scheduler import ScheduledBatch

SUPPORTED_MODEL_TYPES = ("llama",)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attention: AttentionMetadata
    # Rows of the packed batch whose logits are sampled: the last token of every sequence whose
    # scheduled tokens reach its end (decodes, and the final chunk of a prefill).
    sample_indices: torch.Tensor
    sampled_seq_indices: list[int]  # index in the batch of each sampled row


class ModelRunner:
    def __init__(self, config: EngineConfig, model: PreTrainedModel | None = None) -> None:
        """Load config.model, or use `model` (already built, e.g. the benchmark's random-weight stand-in)."""
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        hf_config = model.config if model is not None else AutoConfig.from_pretrained(config.model)
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {hf_config.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=self.dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.hf_config = hf_config
        self.vocab_size: int = hf_config.vocab_size
        self.max_model_len: int = min(
            config.max_model_len or hf_config.max_position_embeddings, hf_config.max_position_embeddings
        )
        self.num_layers: int = hf_config.num_hidden_layers
        self.num_heads: int = hf_config.num_attention_heads
        self.num_kv_heads: int = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.block_size = config.block_size
        self.cos, self.sin = self._rotary_tables()
        self.num_blocks = config.num_blocks or self._num_blocks_from_memory()
        cache_shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_caches = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    # -- set-up ------------------------------------------------------------------------------------------

    def _rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the model's own rotary module (so rope scaling is the model's)."""
        positions = torch.arange(self.max_model_len, device=self.device)[None, :]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.model.model.rotary_emb(probe, positions)
        # transformers computes them in float32 and casts to the activations' dtype; so do we.
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    @property
    def kv_bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def _num_blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            # Room for the largest step's activations and logits, then a fraction of the rest.
            element = torch.tensor([], dtype=self.dtype).element_size()
            tokens = self.config.max_num_batched_tokens
            hidden, inter = self.hf_config.hidden_size, self.hf_config.intermediate_size
            activations = tokens * (4 * hidden + 3 * inter) * element * 2
            logits = self.config.max_num_seqs * self.vocab_size * 4 * 4
            budget = (free - activations - logits) * self.config.kv_cache_memory_fraction
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        num_blocks = int(budget // self.kv_bytes_per_block)
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache")
        return num_blocks

    # -- one step ----------------------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts, query_lens, context_lens, block_tables = [], [], [], []
        sample_indices, sampled_seq_indices = [], []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_scheduled_tokens, strict=True)):
            start = seq.num_computed_tokens
            end = start + n
            query_starts.append(len(input_ids))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            block_tables.append(torch.tensor(table[: -(-end // bs)], dtype=torch.long))
            if end == seq.num_tokens:
                sample_indices.append(len(input_ids) - 1)
                sampled_seq_indices.append(i)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_starts=query_starts,
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=[t.to(dev, non_blocking=True) for t in block_tables],
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True),
            attention=meta,
            sample_indices=torch.tensor(sample_indices, dtype=torch.long).to(dev, non_blocking=True),
            sampled_seq_indices=sampled_seq_indices,
        )

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; return float32 logits [num_sampled, vocab] for the sampled rows."""
        llama = self.model.model
        hidden = llama.embed_tokens(inputs.input_ids)
        cos, sin = self.cos[inputs.positions], self.sin[inputs.positions]
        num_tokens = hidden.shape[0]
        for layer, k_cache, v_cache in zip(llama.layers, self.k_caches, self.v_caches, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            write_kv(k_cache, v_cache, k, v, inputs.attention.slot_mapping)
            o = paged_attention(q, k_cache, v_cache, inputs.attention, self.scale)
            hidden = hidden + attn.o_proj(o.reshape(num_tokens, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = llama.norm(hidden[inputs.sample_indices])
        return self.model.lm_head(hidden).float()
