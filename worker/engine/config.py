"""Engine configuration: set once at start-up, read everywhere, never mutated."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # A local Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    model: str
    # "auto": bfloat16 on CUDA, float32 on CPU (exact parity with transformers on CPU).
    dtype: str = "auto"
    # "auto": cuda when available.
    device: str = "auto"
    # Tokens per KV block. 16 keeps internal fragmentation small and block tables short.
    block_size: int = 16
    # KV pool size in blocks; None sizes it from memory (see kv_cache_memory_fraction / cpu_kv_cache_gib).
    num_blocks: int | None = None
    # Fraction of the GPU memory still free after loading the weights that the KV pool may take.
    kv_cache_memory_fraction: float = 0.9
    # KV pool size on CPU, where "free memory" says little about what is sensible to take.
    cpu_kv_cache_gib: float = 0.5
    # At most this many sequences in one step (decode batch size).
    max_num_seqs: int = 256
    # Token budget of one step: decode tokens + prefill chunk tokens. Prompts longer than what is left
    # are prefilled in chunks over several steps, so a long prompt never stalls running streams.
    max_num_batched_tokens: int = 2048
    # Prefill tokens one step may carry while other sequences are decoding (0: the whole budget; see
    # scheduler.py). Every running stream waits for the whole step, so this bounds the inter-token latency
    # spike a new prompt causes, at some cost in throughput when everything arrives at once (W1). 0 here,
    # for the engine alone; the worker (serving) defaults to 320.
    max_prefill_tokens_while_decoding: int = 0
    # Prompt + generated tokens per sequence; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Reuse the KV blocks of prompt prefixes computed before (see block_manager.py).
    enable_prefix_caching: bool = True
    # "auto": Triton kernels on CUDA, plain torch on CPU. "triton" on CPU runs Triton's interpreter (tests).
    attention_backend: str = "auto"
    # With the Triton backend: fused q/k/v and gate/up projections, fused norm / rotary / SiLU kernels.
    fused_kernels: bool = True
    # With fused kernels on CUDA: batch-1 matrix products through triton_gemv where it beats cuBLAS on this
    # card (timed at start-up, per weight shape).
    triton_gemv: bool = True
    # Likewise for decode batches of 2-32 sequences, through triton_skinny (product_table.py).
    triton_skinny: bool = True
    # Capture decode steps as CUDA graphs (Triton backend on CUDA only).
    cuda_graphs: bool = True
    # With cuda_graphs: also prefill and mixed steps of up to this many tokens, padded to a ladder of sizes.
    # An eager step costs ~9 ms of host time to launch, more than a short prompt's GPU time
    # (prefill_graphs.py). 0: such steps run eagerly.
    prefill_graph_max_tokens: int = 1024
    # Launch a decode step before the previous one's tokens are read, when nothing but a sequence ending
    # can change the batch (lookahead.py): the GPU no longer waits for the host's bookkeeping between steps.
    decode_lookahead: bool = True
    # On CUDA, run every kind of step once at start-up (warm_up.py), so that no kernel compiles while serving.
    warm_up: bool = True
    # Benchmark stand-ins: random weights of the directory's config.json instead of loading weight files.
    random_weights: bool = False
    # Fault injection for tests: a step whose input contains this token id raises (-1: off).
    fault_poison_token_id: int = -1
    # Prompt tokens the detokenizer looks back on, so the first generated word keeps its leading space.
    detokenizer_context_tokens: int = 8

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence must be able to decode one token per step within the budget.
            raise ValueError("need 0 < max_num_seqs <= max_num_batched_tokens")
        if self.prefill_graph_max_tokens < 0:
            raise ValueError("prefill_graph_max_tokens must be 0 (off) or positive")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
