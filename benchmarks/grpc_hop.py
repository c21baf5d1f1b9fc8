"""What the two gRPC hops of a request cost, by kind of client: the TTFT hop without Redis or an engine.

A diagnostic for issue 7. A grpc.aio server in its own process (as the gateway is) answers GenerateStream
with its first token event at once, or after `--think-ms` (a stand-in for the engine's step, so that the
server's loop is asleep again when the token goes out, as at low load). Clients, one request at a time,
`--gap-ms` apart, time the call from its start to the first token event:

  aio              grpc.aio, as `codestream bench` and most asyncio services call;
  sync             the blocking client (a channel thread polls the completion queue and hands over);
  sync-1thread     the blocking client with grpc.experimental.ChannelOptions.SingleThreadedUnaryStream:
                   the calling thread polls for the stream's messages itself, no hand-over.

Each row is measured with the server's loop sleeping between requests, then busy-polling
(codestream/busy_poll.py). The server's share shows in the difference between its rows; the clients' in
the difference between theirs.

gRPC reads its GRPC_EXPERIMENTS when it is imported, so the server runs in a process of its own:
`--server-experiments` gives it its own (the clients take this process's environment). `--iomgr` runs the
rows again with the server on iomgr's endpoints instead of EventEngine's (IOMGR below: what `codestream
gateway` runs on), then with the clients on them too.

    python -m benchmarks.grpc_hop [--requests 300] [--think-ms 5] [--gap-ms 2] [--iomgr]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc
import grpc.experimental  # (not imported by `import grpc` alone: ChannelOptions)

from codestream import busy_poll, grpc_io
from codestream.redis_server import free_port
from protos import api, api_grpc

# gRPC's EventEngine endpoints off: a socket's reads are done by the thread that polls the completion queue
# (iomgr, epoll1), not by an EventEngine thread that then wakes it. The gateway's default (codestream/grpc_io.py).
IOMGR = grpc_io.IOMGR_EXPERIMENTS

QUEUED = api.GenerateEvent(seq=0)
TOKEN = api.GenerateEvent(seq=1)


class Servicer(api_grpc.CodeStreamServicer):
    def __init__(self, think_s: float) -> None:
        self.think_s = think_s

    async def GenerateStream(self, request, context):
        yield QUEUED
        if self.think_s:
            await asyncio.sleep(self.think_s)
        yield TOKEN


async def _serve(port: int, think_s: float) -> None:
    server = grpc.aio.server()
    api_grpc.add_CodeStreamServicer_to_server(Servicer(think_s), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve(port: int, think_s: float, spin_us: int) -> None:
    with asyncio.Runner(loop_factory=busy_poll.loop_factory(spin_us)) as runner:
        runner.run(_serve(port, think_s))


def start_server(port: int, think_s: float, spin_us: int, experiments: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.grpc_hop", "--serve", str(port), "--think-ms", str(think_s * 1e3)]
    command += ["--spin-us", str(spin_us)]
    env = {**os.environ, "GRPC_EXPERIMENTS": experiments}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("the gRPC hop's server did not start")
    return server


def request() -> api.GenerateRequest:
    return api.GenerateRequest(prompt="def f(x):", stopping=api.StoppingCriteria(max_new_tokens=1))


async def aio_client(target: str, count: int, gap_s: float) -> list[float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_grpc.CodeStreamStub(channel)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            async for event in stub.GenerateStream(request()):
                if event.seq == 1:
                    times.append(time.perf_counter() - started)
            await asyncio.sleep(gap_s)
        return times


def sync_client(target: str, count: int, gap_s: float, single_thread: bool) -> list[float]:
    options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)] if single_thread else []
    with grpc.insecure_channel(target, options=options) as channel:
        stub = api_grpc.CodeStreamStub(channel)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            for event in stub.GenerateStream(request()):
                if event.seq == 1:
                    times.append(time.perf_counter() - started)
            time.sleep(gap_s)
        return times


def measure(server_experiments: str, n: int, think_s: float, gap_s: float) -> None:
    for spin_us in (0, 100_000):
        port = free_port()
        server = start_server(port, think_s, spin_us, server_experiments)
        target = f"127.0.0.1:{port}"
        for name in ("aio", "sync", "sync-1thread"):
            if name == "aio":
                raw = asyncio.run(aio_client(target, n, gap_s))
            else:
                raw = sync_client(target, n, gap_s, single_thread=name == "sync-1thread")
            times = [t - think_s for t in raw[20:]]
            q = statistics.quantiles(times, n=10)
            where = "busy-polling" if spin_us else "sleeping"
            print(
                f"  server {where:12s} client {name:12s} median {statistics.median(times) * 1e6:5.0f} us"
                f"  p10 {q[0] * 1e6:5.0f}  p90 {q[-1] * 1e6:5.0f}",
                flush=True,
            )
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--think-ms", type=float, default=5.0)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--server-experiments", default=os.environ.get("GRPC_EXPERIMENTS", ""))
    parser.add_argument("--iomgr", action="store_true", help="then the server on iomgr, then the clients too")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # (the server's own process: its port)
    parser.add_argument("--spin-us", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    think_s, gap_s, n = args.think_ms / 1000, args.gap_ms / 1000, args.requests
    if args.serve:
        serve(args.serve, think_s, args.spin_us)
        return
    clients = os.environ.get("GRPC_EXPERIMENTS", "")
    print(f"call start -> first token event, server thinks {args.think_ms:g} ms (subtracted), {n} requests;")
    print(f" server GRPC_EXPERIMENTS={args.server_experiments!r}, clients {clients!r}:", flush=True)
    measure(args.server_experiments, n, think_s, gap_s)
    if args.iomgr:
        print(f" server GRPC_EXPERIMENTS={IOMGR!r}, clients {clients!r}:", flush=True)
        measure(IOMGR, n, think_s, gap_s)
        # (the clients' experiments are this process's: a process of their own)
        again = [sys.executable, "-m", "benchmarks.grpc_hop", "--requests", str(n), "--think-ms", str(args.think_ms)]
        again += ["--gap-ms", str(args.gap_ms), f"--server-experiments={IOMGR}"]
        subprocess.run(again, env={**os.environ, "GRPC_EXPERIMENTS": IOMGR}, check=True)


if __name__ == "__main__":
    main()
