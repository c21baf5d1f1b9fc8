"""Worker settings. Each field is a flag (`--redis-url`) and an environment variable
(`CODESTREAM_REDIS_URL`); see codestream/settings.py for how they are read."""

from __future__ import annotations

from dataclasses import dataclass, field


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class WorkerConfig:
    model: str = setting("demo", "model directory or hub id (or 'demo')")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://, user:password@)")
    namespace: str = setting("codestream", "prefix of every Redis key and channel")
    worker_id: str = setting("", "consumer name in the jobs group; empty: hostname + random suffix")
    metrics_port: int = setting(9091, "Prometheus metrics HTTP port; 0: off")
    device: str = setting("auto", "cuda, cpu or auto")
    dtype: str = setting("auto", "bfloat16, float16, float32 or auto (bfloat16 on GPU, float32 on CPU)")
    max_num_seqs: int = setting(256, "most sequences in one engine step")
    max_num_batched_tokens: int = setting(2048, "token budget of one engine step (decode + prefill chunks)")
    max_prefill_tokens_while_decoding: int = setting(
        320, "prefill tokens a step may carry while streams are decoding (bounds their ITL spikes); 0: no cap"
    )
    max_model_len: int = setting(0, "context limit; 0: the model's")
    num_blocks: int = setting(0, "KV cache blocks; 0: sized from memory")
    block_size: int = setting(16, "tokens per KV block")
    kv_cache_memory_fraction: float = setting(0.9, "share of free GPU memory the KV cache may take")
    cpu_kv_cache_gib: float = setting(0.5, "KV cache size on CPU")
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of prompt prefixes seen before")
    cuda_graphs: bool = setting(True, "replay decode steps as CUDA graphs (GPU)")
    prefill_graph_max_tokens: int = setting(
        1024, "with --cuda-graphs, also replay prefill steps of up to this many tokens as graphs; 0: eager"
    )
    triton_gemv: bool = setting(True, "batch-1 matrix products through the Triton GEMV where it beats cuBLAS (GPU)")
    triton_skinny: bool = setting(True, "2-32-row matrix products through a Triton kernel where it beats cuBLAS (GPU)")
    decode_lookahead: bool = setting(True, "launch a decode step before the previous one's tokens are read")
    busy_poll_us: int = setting(
        0, "poll the event loop this long after its last I/O, not sleep (a busy core; ~0.05 ms a hop); 0: off"
    )
    heartbeat_s: float = setting(2.0, "how often the worker renews its job leases and liveness key")
    lease_s: float = setting(15.0, "a job whose worker has not renewed it for this long is taken over")
    max_deliveries: int = setting(5, "a job delivered more often goes to the dead-letter stream")
    event_log_ttl_s: int = setting(600, "how long a request's events stay in Redis after its last one")
    random_weights: bool = setting(False, "benchmark stand-in: random weights of the model's config, no weight files")
    fault_poison_token_id: int = setting(-1, "fault injection for tests: the engine fails on this prompt token")
    shutdown_grace_s: float = setting(60.0, "on SIGTERM, how long running requests may take to finish")
