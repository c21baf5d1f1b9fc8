"""`codestream serve`: the whole stack in one command, as separate processes like in production.

    embedded Redis-protocol server  <-  worker process  (engine)
                                    <-  gateway process (gRPC on --port, HTTP on --http-port)

The embedded server is reached through its Unix socket: each hop through Redis is shorter than through TCP
loopback (`python -m benchmarks.wakeups`), and nothing else on the host can reach it.

The model is resolved (the demo model built) once, up front, so both children find it ready. If any
child exits, the others are stopped; Ctrl-C / SIGTERM drains the gateway, then the worker.
--spin-idle-cpus keeps the host's idle CPUs from halting while the stack runs (codestream/idle_spin.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from codestream import idle_spin
from codestream.models import resolve_model
from codestream.redis_server import EmbeddedRedis

log = structlog.get_logger("serve")


def serve_stack(args: argparse.Namespace) -> int:
    if not args.spin_idle_cpus:
        if idle_spin.idle_cpus_halt_in_a_vm():
            log.info(
                "hint", idle_cpus="halt (a virtual machine without a cpuidle driver)",
                try_flag="--spin-idle-cpus: 0.5-1.3 ms off each first token, every idle CPU at 100 %",
            )  # fmt: skip
        return _serve(args)
    with idle_spin.spinning() as spinners:
        log.info("idle_cpus_spinning", cpus=len(spinners))
        if idle_spin.smt_active():
            log.warning("idle_cpus_spinning_with_smt", effect="a spinner slows the thread on its core's sibling")
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model)
    log.info("model_ready", model=args.model, path=model_dir)
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(unix_socket=True)
        redis_url = embedded.start()
        log.info("redis_started", url=redis_url, binary=embedded.binary)
    env = {**os.environ, "CODESTREAM_REDIS_URL": redis_url, "CODESTREAM_MODEL": args.model}
    python = [sys.executable, "-m", "codestream.cli"]
    children: list[subprocess.Popen] = []
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        children.append(subprocess.Popen([*python, "worker", "--device", args.device], env=env))
        # Unset, the gateway reads CODESTREAM_HTTP_PORT from the environment it inherits.
        http = ["--http-port", str(args.http_port)] if args.http_port is not None else []
        children.append(subprocess.Popen([*python, "gateway", "--port", str(args.port), *http], env=env))
        target = f"localhost:{args.port}"
        if _wait_serving(target, children, lambda: stopping):
            log.info(
                "stack_ready",
                target=target,
                try_it=f'codestream generate "def fibonacci(n):" --target {target}',
            )
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
        failed = [c for c in children if c.poll() not in (None, 0)]
        return 1 if failed and not stopping else 0
    finally:
        # Gateway first (it drains its streams), then the worker, then Redis.
        for child in reversed(children):
            stop_child(child, timeout_s=90)
        if embedded:
            embedded.close()
        log.info("stack_stopped")


def stop_child(child: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (a gateway or worker drains on it), then SIGKILL if it is still there after `timeout_s`."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _wait_serving(target: str, children: list[subprocess.Popen], stopping, timeout_s: float = 600) -> bool:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not stopping():
            if any(c.poll() is not None for c in children):
                return False
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False
