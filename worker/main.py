"""Start a worker process: load the engine, connect to Redis, serve jobs until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import signal
import socket
import uuid

import structlog

from codestream import redis_client
from protos.fingerprint import tokenizer_fingerprint
from protos.keys import Keys
from worker.config import WorkerConfig
from worker.engine import EngineConfig, LLMEngine
from worker.service import Worker

log = structlog.get_logger("worker")


def engine_config(config: WorkerConfig, model_dir: str) -> EngineConfig:
    return EngineConfig(
        model=model_dir,
        dtype=config.dtype,
        device=config.device,
        block_size=config.block_size,
        num_blocks=config.num_blocks or None,
        kv_cache_memory_fraction=config.kv_cache_memory_fraction,
        cpu_kv_cache_gib=config.cpu_kv_cache_gib,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding,
        max_model_len=config.max_model_len or None,
        enable_prefix_caching=config.enable_prefix_caching,
        cuda_graphs=config.cuda_graphs,
        prefill_graph_max_tokens=config.prefill_graph_max_tokens,
        triton_gemv=config.triton_gemv,
        triton_skinny=config.triton_skinny,
        decode_lookahead=config.decode_lookahead,
        fault_poison_token_id=config.fault_poison_token_id,
        random_weights=config.random_weights,
    )


def make_worker(config: WorkerConfig, model_dir: str, engine: LLMEngine | None = None) -> Worker:
    engine = engine or LLMEngine(engine_config(config, model_dir))
    worker_id = config.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    return Worker(
        engine,
        redis_client.connect(config.redis_url),
        Keys(config.namespace),
        worker_id,
        tokenizer_fingerprint(model_dir),
        lease_s=config.lease_s,
        max_deliveries=config.max_deliveries,
        event_log_ttl_s=config.event_log_ttl_s,
    )


async def run_worker(config: WorkerConfig, model_dir: str) -> None:
    log.info("loading_model", model=model_dir, device=config.device, dtype=config.dtype)
    worker = make_worker(config, model_dir)
    stats = worker.engine.stats()
    log.info(
        "engine_ready",
        device=str(worker.engine.runner.device),
        blocks=stats.num_blocks,
        kv_tokens=worker.engine.kv_capacity_tokens,
        max_model_len=worker.engine.max_model_len,
        # ms per pass over each weight shape at 1-32 rows (our Triton kernels vs cuBLAS; the faster one runs).
        products=worker.engine.runner.product_timings or None,
        graphs=worker.engine.runner.graph_stats or None,
        # Every kind of step the graphs do not cover, run once so that nothing compiles while serving.
        warm_up=dataclasses.asdict(worker.engine.warm_up_report) if worker.engine.warm_up_report else None,
    )
    worker.metrics.serve(config.metrics_port)
    # The model, tokenizer and graphs are built and live for good: move them out of the collector's view, so
    # that no collection during a step walks them (a full collection of this heap costs milliseconds).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.run(stop, heartbeat_s=config.heartbeat_s, shutdown_grace_s=config.shutdown_grace_s)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(worker.redis.aclose(), timeout=2)
