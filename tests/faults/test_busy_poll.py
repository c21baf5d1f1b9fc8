"""Not a fault: the gateway and a worker started with `--busy-poll-us` (codestream/busy_poll.py), as real
processes. They serve streams as the plain ones do (the worker's loop pauses its polling while the engine
thread computes), go back to sleep when idle, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc

from tests.faults.conftest import (
    PROMPTS,
    Cluster,
    Process,
    Reference,
    assert_exactly_once,
    generate_request,
    open_stream,
)

WINDOW_US = 30_000


def cpu_seconds(process: Process) -> float:
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def test_busy_polling_processes_serve_streams_then_sleep(cluster: Cluster, reference: Reference) -> None:
    worker = cluster.start_worker("worker", busy_poll_us=WINDOW_US)
    gateway = cluster.start_gateway("gateway", busy_poll_us=WINDOW_US)
    await cluster.ready(worker, gateway)
    stub = cluster.stub(gateway)

    prompts, max_new = PROMPTS[:6], 40
    for round_ in range(2):  # one at a time (the idle worker's own loop runs the step), then all at once
        group = [prompts[:3], prompts[3:]][round_]
        batch = [open_stream(stub, generate_request(p, max_new), timeout_s=60) for p in group]
        if round_ == 0:
            streams = []
            for _, task, _ in batch:
                streams.append(await task)
        else:
            streams = await asyncio.gather(*(task for _, task, _ in batch))
        for i, (stream, want) in enumerate(zip(streams, reference.tokens(group, max_new), strict=True)):
            assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
            assert_exactly_once(stream.events, want, f"round {round_} stream {i}")

    # Idle, the two loops poll only for 30 ms after each of their own I/O (heartbeats, blocking reads): a
    # loop that spun on would use a whole core.
    await asyncio.sleep(0.5)
    before = cpu_seconds(worker) + cpu_seconds(gateway)
    await asyncio.sleep(2.0)
    idle = cpu_seconds(worker) + cpu_seconds(gateway) - before
    assert idle < 1.0, f"idle gateway + worker used {idle:.2f} s of CPU in 2 s"

    worker.send(signal.SIGTERM)
    gateway.send(signal.SIGTERM)
    assert await worker.wait_exit(30) == 0, worker.tail()
    assert await gateway.wait_exit(30) == 0, gateway.tail()
