"""Shared fixtures: a real Redis-protocol server on a free port, the demo model, and a whole stack
(worker + gateway, in this process, over real Redis and a real gRPC port)."""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before triton is first
# imported (torch and transformers import it), so here, ahead of every other import.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from codestream.demo_model import ensure_demo_model
from codestream.redis_server import EmbeddedRedis
from gateway.config import GatewayConfig
from gateway.server import Gateway, start_gateway
from protos import api_grpc
from worker.config import WorkerConfig
from worker.main import make_worker
from worker.service import Worker


@pytest.fixture(scope="session")
def redis_url() -> str:
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


@dataclass
class Stack:
    gateway: Gateway
    worker: Worker
    channel: grpc.aio.Channel
    stub: api_grpc.CodeStreamStub
    namespace: str


@dataclass
class RunningWorker:
    worker: Worker
    task: asyncio.Task
    stop: asyncio.Event

    def crash(self) -> None:
        """Play a worker that died: its tasks stop where they are, with no drain and no goodbye."""
        for task in self.worker.tasks:
            task.cancel()
        self.task.cancel()


def start_worker(redis_url: str, model_dir: Path, namespace: str, grace_s: float = 5, **settings) -> RunningWorker:
    settings = {"metrics_port": 0, **settings}
    config = replace(WorkerConfig(), redis_url=redis_url, namespace=namespace, model=str(model_dir), **settings)
    worker = make_worker(config, str(model_dir))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, heartbeat_s=config.heartbeat_s, shutdown_grace_s=grace_s))
    return RunningWorker(worker, task, stop)


async def start_test_gateway(redis_url: str, model_dir: Path, namespace: str, **settings) -> Gateway:
    settings = {"metrics_port": 0, **settings}
    config = replace(
        GatewayConfig(), redis_url=redis_url, namespace=namespace, model=str(model_dir), host="127.0.0.1", port=0,
        **settings,
    )  # fmt: skip
    return await start_gateway(config, str(model_dir))


@contextlib.asynccontextmanager
async def running_stack(
    redis_url: str,
    model_dir: Path,
    *,
    worker: dict | None = None,
    gateway: dict | None = None,
    start_worker: bool = True,
) -> AsyncIterator[Stack]:
    """A worker and a gateway on their own namespace of the shared Redis, and a client channel."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    worker = {"metrics_port": 0, **(worker or {})}
    gateway = {"metrics_port": 0, **(gateway or {})}
    wcfg = replace(WorkerConfig(), redis_url=redis_url, namespace=namespace, model=str(model_dir), **worker)
    gcfg = replace(
        GatewayConfig(),
        redis_url=redis_url,
        namespace=namespace,
        model=str(model_dir),
        host="127.0.0.1",
        port=0,
        **gateway,
    )
    w = make_worker(wcfg, str(model_dir))
    stop = asyncio.Event()
    worker_task = asyncio.create_task(w.run(stop, heartbeat_s=0.5, shutdown_grace_s=5)) if start_worker else None
    gw = await start_gateway(gcfg, str(model_dir))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    try:
        yield Stack(gw, w, channel, api_grpc.CodeStreamStub(channel), namespace)
    finally:
        await channel.close()
        await gw.stop(grace_s=1)
        stop.set()
        if worker_task:
            await asyncio.wait_for(worker_task, timeout=30)
        await w.redis.aclose()
