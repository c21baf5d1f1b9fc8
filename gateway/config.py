"""Gateway settings. Each field is a flag (`--redis-url`) and an environment variable
(`CODESTREAM_REDIS_URL`); see codestream/settings.py for how they are read."""

from __future__ import annotations

from dataclasses import dataclass, field


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GatewayConfig:
    model: str = setting("demo", "model directory (or 'demo'); the gateway reads only tokenizer and config")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://, user:password@)")
    namespace: str = setting("codestream", "prefix of every Redis key and channel")
    host: str = setting("0.0.0.0", "gRPC listen address")
    port: int = setting(50051, "gRPC listen port")
    metrics_port: int = setting(9090, "Prometheus metrics HTTP port; 0: off")
    http_port: int = setting(0, "HTTP API port (the model card's /score, OpenAI-compatible /v1/...), on --host; 0: off")
    max_connection_age_s: float = setting(
        0.0, "close client connections after this long (new ones spread over gateways); 0: never"
    )
    max_connection_age_grace_s: float = setting(
        600.0, "how long a connection being closed for age may finish its streams"
    )
    max_model_len: int = setting(0, "context limit enforced on requests; 0: the model's")
    max_new_tokens_default: int = setting(256, "max_new_tokens when a request leaves it unset")
    max_new_tokens_limit: int = setting(4096, "largest max_new_tokens a request may ask for")
    max_prompt_chars: int = setting(1_000_000, "largest prompt, in characters")
    max_stop_sequences: int = setting(16, "most stop sequences per request")
    max_stop_sequence_chars: int = setting(256, "longest stop sequence, in characters")
    max_logprobs: int = setting(5, "most log-probability alternatives per token")
    max_samples: int = setting(16, "largest sampling.n (samples per prompt)")
    max_logit_bias: int = setting(300, "most sampling.logit_bias entries")
    max_active_streams: int = setting(4096, "requests in flight on this gateway before RESOURCE_EXHAUSTED")
    max_inflight_requests: int = setting(10_000, "requests queued or running across all gateways; 0: no limit")
    max_inflight_tokens: int = setting(0, "prompt + max_new_tokens queued or running across all gateways; 0: no limit")
    tenant_max_concurrency: int = setting(0, "requests in flight per API key (tenant); 0: no limit")
    tenant_tokens_per_s: float = setting(0.0, "token rate (prompt + max_new_tokens) per API key; 0: no limit")
    tenant_token_burst: int = setting(0, "token bucket size per API key; 0: 10 seconds of the rate")
    request_timeout_s: float = setting(600.0, "deadline of a request whose client set none")
    deadline_grace_s: float = setting(2.0, "how long past a deadline the gateway waits for the worker's word")
    cancel_key_ttl_s: int = setting(900, "lifetime of the key that cancels a job not yet picked up")
    shutdown_delay_s: float = setting(0.0, "on SIGTERM, how long to report NOT_SERVING before refusing new calls")
    shutdown_grace_s: float = setting(30.0, "on SIGTERM, how long in-flight streams may take to finish")
    busy_poll_us: int = setting(
        0, "poll the event loop this long after its last I/O, not sleep (a busy core; ~0.05 ms a hop); 0: off"
    )
    outage_bound_s: float = setting(10.0, "how long a stream waits for Redis to come back before UNAVAILABLE")
    disconnect_grace_s: float = setting(
        0.0, "after a client disconnects, how long its job keeps running for a Resume before it is cancelled"
    )
    api_keys_file: str = setting(
        "", "file of 'tenant:key' lines (a mounted Secret), re-read when it changes; empty: no authentication"
    )
    tls_cert_file: str = setting("", "PEM certificate (chain) of the gRPC port; with --tls-key-file: TLS")
    tls_key_file: str = setting("", "PEM private key of --tls-cert-file")
    tls_client_ca_file: str = setting("", "PEM CA bundle; when set, clients must show a certificate it signed (mTLS)")
