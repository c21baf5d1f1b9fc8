"""The Redis side of a request's way to its first token, piece by piece (CPU; a diagnostic for issue 7).

- Packing: the admission call's 24 arguments into the wire format, by redis-py's asyncio connection (Python)
  and by hiredis (codestream/redis_client.py).
- Scripts: the server's own time per call (INFO commandstats) of the admission script (gateway/admission.py,
  with the default limits: 10,000 requests in flight, nothing else) and of a one-event emit
  (worker/emitter.py), next to the bare command each wraps (XADD, PUBLISH), and the client's round trip.

    python -m benchmarks.hop_costs [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit

from redis.asyncio.connection import Connection

from codestream.redis_client import HiredisPackedConnection, connect
from codestream.redis_server import EmbeddedRedis
from gateway.admission import Admission, Limits
from protos import api, bus
from protos.keys import Keys
from worker.emitter import Emission, Emitter

JOB = bus.Job(request_id="t:r", reply_channel="codestream:gw:g", prompt_token_ids=list(range(512))).SerializeToString()
EVENT = api.GenerateEvent(request_id="t:r", seq=1, tokens=api.TokenChunk(text="x", token_ids=[5])).SerializeToString()


def packing() -> None:
    keys = Keys()
    args = ("EVALSHA", "ab" * 20, 8, keys.jobs, keys.attached("t:r"), keys.request_claim("t:r"), keys.inflight,
            keys.inflight_tokens, keys.tenant_inflight(""), keys.tenant_bucket(""), keys.attempt("t:r"), JOB, "g",
            660, 0, 1795679554474, "t:r", 1795680154474, 520, 10_000, 0, 0, 0.0, 0)  # fmt: skip
    for name, connection in (("redis-py (Python)", Connection()), ("hiredis", HiredisPackedConnection())):
        n = 20_000
        us = timeit.timeit(lambda c=connection: c.pack_command(*args), number=n) / n * 1e6
        print(f"pack the admission call ({len(args)} arguments), {name}: {us:.1f} us")


async def scripts(url: str, calls: int) -> None:
    redis = connect(url)
    keys = Keys("hopcosts")
    admission = Admission(redis, keys, Limits(max_requests=10_000), "g")
    emitter = Emitter(redis, keys, log_ttl_s=600)

    async def enqueue(i: int) -> None:
        await admission.enqueue(f"r{i}", "", JOB, 520, time.time() + 60, claim=False)

    async def emit(i: int) -> None:
        await emitter.emit([Emission(f"r{i}", 1, 1, EVENT, keys.gateway_channel("g"), None)])

    async def xadd(_i: int) -> None:
        await redis.xadd(keys.jobs, {"job": JOB})

    async def publish(_i: int) -> None:
        await redis.publish(keys.gateway_channel("g"), EVENT)

    rows = [
        ("admission script", enqueue, "evalsha"),
        ("XADD alone", xadd, "xadd"),
        ("emit script, 1 event", emit, "evalsha"),
        ("PUBLISH alone", publish, "publish"),
    ]
    for name, call, command in rows:
        await redis.config_resetstat()
        times = []
        for i in range(calls):
            started = time.perf_counter()
            await call(i)
            times.append(time.perf_counter() - started)
        server = (await redis.info("commandstats"))[f"cmdstat_{command}"]["usec_per_call"]
        client_us = statistics.median(times) * 1e6
        print(f"{name:22s} server {server:5.1f} us per call, client round trip median {client_us:4.0f} us")
        await redis.flushdb()
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    packing()
    with EmbeddedRedis() as server:
        asyncio.run(scripts(server.url, args.calls))


if __name__ == "__main__":
    main()
