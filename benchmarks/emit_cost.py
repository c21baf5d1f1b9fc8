"""What the worker's emit costs on its own: the Lua script that fences, logs and publishes one step's events.

    python -m benchmarks.emit_cost                      # 32 streams, one step every 10.8 ms (c=32 on an H100)
    python -m benchmarks.emit_cost --streams 128 --step-ms 23

An embedded Redis (as `codestream serve`'s, through its Unix socket), the worker's own Emitter, and nothing
else: every `--step-ms` one emit of one token event per stream, as the worker sends after each engine step,
with a subscriber on the gateway channel. Prints the emit's round trip (median, p90, p99, max) and Redis's own
time per call (INFO commandstats). Read against the stack's per-hop tails (`benchmarks.ttft_hops tails`):
what the script costs by itself, and so what is waiting (Redis's queue, the worker's loop) when the stack's
emit round trip is longer.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from redis.asyncio import Redis

from codestream.redis_server import EmbeddedRedis
from protos import api
from protos.keys import Keys
from worker.emitter import Emission, Emitter


async def measure(streams: int, steps: int, step_s: float) -> dict[str, float]:
    with EmbeddedRedis(unix_socket=True) as server:
        redis = Redis.from_url(server.url)
        emitter = Emitter(redis, Keys(), log_ttl_s=600)
        subscriber = redis.pubsub()
        await subscriber.subscribe("gateway")
        names = [f"request-{i}" for i in range(streams)]
        for name in names:
            await emitter.claim(name, 1)
        round_trips = []
        next_step = time.perf_counter()
        for seq in range(1, steps + 1):
            emissions = [
                Emission(name, 1, seq, api.GenerateEvent(request_id=name, seq=seq).SerializeToString(), "gateway", None)
                for name in names
            ]
            sent = time.perf_counter()
            await emitter.emit(emissions)
            round_trips.append((time.perf_counter() - sent) * 1e3)
            next_step += step_s
            await asyncio.sleep(max(0.0, next_step - time.perf_counter()))
        stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
        await subscriber.aclose()
        await redis.aclose()
    measured = sorted(round_trips[steps // 10 :])  # after a warm-up tenth
    return {
        "median_ms": statistics.median(measured),
        "p90_ms": measured[int(0.9 * (len(measured) - 1))],
        "p99_ms": measured[int(0.99 * (len(measured) - 1))],
        "max_ms": measured[-1],
        "redis_us_per_call": float(stats.get("usec_per_call", 0.0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--step-ms", type=float, default=10.8)
    args = parser.parse_args(argv)
    r = asyncio.run(measure(args.streams, args.steps, args.step_ms / 1e3))
    print(
        f"emit of {args.streams} events every {args.step_ms} ms: round trip median {r['median_ms']:.3f} ms, p90 "
        f"{r['p90_ms']:.3f}, p99 {r['p99_ms']:.3f}, max {r['max_ms']:.3f}; Redis's own time per call "
        f"{r['redis_us_per_call']:.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
