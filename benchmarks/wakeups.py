"""What one hop through Redis costs on this machine, and how much of it is waking a sleeping process.

A diagnostic for the TTFT hop (issue 7), not part of the service. Two processes and the embedded Redis:
a sender stamps the time into a message and sends it (XADD to a stream, or PUBLISH), a receiver blocked
on it (XREADGROUP BLOCK, or a subscription) notes when it arrives. Between messages everyone sleeps
(`--gap-ms`), as at low load, where a request's hops each find the next process asleep.

Rows: the receiver waits asleep in the event loop (as the worker and gateway do), or keeps its event loop
busy (a callback that reschedules itself, so that epoll is polled without sleeping): the difference is the
receiver's wake-up. A warm round trip (PING back to back) is the floor of one request and its reply.

Each through TCP loopback, then the server's Unix socket, then TCP again (to see drift).

    python -m benchmarks.wakeups [--messages 400] [--gap-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

from codestream.redis_client import connect
from codestream.redis_server import EmbeddedRedis

PAYLOAD = b"x" * 1000  # about a 512-token job


async def _send(url: str, kind: str, count: int, gap_s: float, ready: mp.Queue) -> None:
    redis = connect(url)
    ready.get()
    for _ in range(count):
        stamp = f"{time.time():.6f}".encode()
        if kind == "stream":
            await redis.xadd("wakeups:jobs", {"job": stamp + PAYLOAD})
        else:
            await redis.publish("wakeups:channel", stamp + PAYLOAD)
        await asyncio.sleep(gap_s)
    await redis.aclose()


def sender(url: str, kind: str, count: int, gap_s: float, ready: mp.Queue) -> None:
    asyncio.run(_send(url, kind, count, gap_s, ready))


async def receive(url: str, kind: str, count: int, busy: bool, ready: mp.Queue) -> list[float]:
    redis = connect(url)
    loop = asyncio.get_running_loop()
    done = False

    def keep_busy() -> None:
        if not done:
            loop.call_soon(keep_busy)

    if busy:
        loop.call_soon(keep_busy)
    latencies = []
    if kind == "stream":
        await redis.delete("wakeups:jobs")
        await redis.xgroup_create("wakeups:jobs", "g", id="$", mkstream=True)
        ready.put(1)
        while len(latencies) < count:
            reply = await redis.xreadgroup("g", "c", {"wakeups:jobs": ">"}, count=1, block=5000)
            now = time.time()
            data = reply[0][1][0][1][b"job"]
            latencies.append(now - float(data[:17]))
    else:
        pubsub = redis.pubsub()
        await pubsub.subscribe("wakeups:channel")
        ready.put(1)
        while len(latencies) < count:
            reply = await pubsub.parse_response(block=True)
            now = time.time()
            if reply[0] == b"message":
                latencies.append(now - float(reply[2][:17]))
        await pubsub.aclose()
    done = True
    await redis.aclose()
    return latencies


async def warm_round_trip(url: str, count: int) -> list[float]:
    redis = connect(url)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await redis.ping()
        times.append(time.perf_counter() - started)
    await redis.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()
    with EmbeddedRedis(unix_socket=True) as server:
        for transport, url in (("tcp", server.tcp_url), ("unix", server.url), ("tcp", server.tcp_url)):
            hops(url, transport, args.messages, args.gap_ms)


def hops(url: str, transport: str, messages: int, gap_ms: float) -> None:
    ping = asyncio.run(warm_round_trip(url, messages))
    print(f"[{transport}] warm PING round trip (back to back): median {statistics.median(ping) * 1e6:.0f} us")
    print(f"[{transport}] one hop, sender -> Redis -> receiver, {gap_ms:g} ms apart ({messages} messages):")
    for kind in ("stream", "pubsub"):
        for busy in (False, True):
            ready: mp.Queue = mp.Queue()
            process = mp.Process(target=sender, args=(url, kind, messages, gap_ms / 1000, ready))
            process.start()
            latencies = asyncio.run(receive(url, kind, messages, busy, ready))[20:]
            process.join()
            waits = "busy loop" if busy else "asleep   "
            q = statistics.quantiles(latencies, n=10)
            print(
                f"  {kind:6s} receiver {waits}  median {statistics.median(latencies) * 1e6:5.0f} us"
                f"  p10 {q[0] * 1e6:5.0f}  p90 {q[-1] * 1e6:5.0f}"
            )


if __name__ == "__main__":
    main()
