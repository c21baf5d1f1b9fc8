"""`codestream bench`: load a running gateway the way its users would, and measure it.

    codestream bench --concurrency 32 --num-prompts 256 --input-len 128:1024 --output-len 256
    codestream bench --rate 8 --num-prompts 200 --prompts code --output-len 128 --slo ttft:500 --slo tpot:50

Load: open loop (`--rate R`: Poisson arrivals at R requests/s), closed loop (`--concurrency C` alone: C
clients, each sending its next request when its last one ended), or both (arrivals at R/s, at most C in
flight), as vLLM's benchmark_serving. Neither: every request at once.

Prompts: random token ids of seeded random lengths (`--input-len MIN:MAX`; at seed 0, lengths then ids
drawn as benchmarks/engine.py draws W1's, so the two see the same prompts), or a file of code prompts
(`--prompts FILE`, JSON lines with a "prompt"; `--prompts code` is the set shipped in
benchmarks/prompts/, HumanEval-style function headers), cycled to --num-prompts.

Client: grpc.aio (default), or `--client sync`: the blocking client, one request at a time, with the
calling thread reading the stream itself (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, no
hand-over from a channel thread). The leanest Python client: what a request costs with it is the service's,
not the asyncio client's (`python -m benchmarks.grpc_hop` compares them).

Every request streams through GenerateStream; the figures are defined in codestream/bench_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental  # (not imported by `import grpc` alone: ChannelOptions)
from tqdm import tqdm

from codestream import gc_pauses
from codestream.bench_report import Outcome, parse_slos, print_table, summarize
from protos import api, api_grpc

SHIPPED_PROMPTS = {"code": Path(__file__).resolve().parent.parent / "benchmarks" / "prompts" / "code.jsonl"}
FIRST_RANDOM_ID = 3  # after <unk>, <s>, </s>: as benchmarks/engine_setup.py's FIRST_PROMPT_ID


@dataclass(frozen=True)
class Options:
    target: str = "127.0.0.1:50051"
    num_prompts: int = 100
    rate: float = 0.0  # requests/s, Poisson; 0: no pacing
    concurrency: int = 0  # most requests in flight; 0: no cap
    input_len: str = "128:1024"  # random prompts: MIN:MAX tokens (or one number)
    output_len: int = 256
    prompts: str = ""  # a JSON-lines file, or a name in SHIPPED_PROMPTS; empty: random token ids
    ignore_eos: bool = True  # every request generates output_len tokens (comparable runs)
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    warmup: int = 0  # requests sent (one at a time) and not counted, before the run
    timeout_s: float = 600.0  # per request
    channels: int = 1  # gRPC channels the requests spread over (each one HTTP/2 connection)
    slo: tuple[str, ...] = ()  # "ttft:MS", "tpot:MS", "e2e:MS"
    api_key: str = ""
    progress: bool = True
    client: str = "aio"  # or "sync": one request at a time, the blocking client reading in this thread


@dataclass
class Prompt:
    text: str = ""
    token_ids: tuple[int, ...] = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Options()
    add = parser.add_argument
    add("--target", default=defaults.target, help="gateway host:port")
    add("--num-prompts", type=int, default=defaults.num_prompts, help="requests to send")
    add("--rate", type=float, default=0.0, help="Poisson arrivals, requests/s (open loop); 0: no pacing")
    add("--concurrency", type=int, default=0, help="most requests in flight (closed loop alone); 0: no cap")
    add("--input-len", default=defaults.input_len, help="random prompts: MIN:MAX tokens (uniform), or N")
    add("--output-len", type=int, default=defaults.output_len, help="max_new_tokens of every request")
    add("--prompts", default="", help="JSON lines with a 'prompt' field, or 'code' (shipped); default: random ids")
    add("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    add("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    add("--seed", type=int, default=0, help="seed of prompts, arrivals and sampling")
    add("--warmup", type=int, default=0, help="requests sent first, one at a time, not counted")
    add("--timeout-s", type=float, default=defaults.timeout_s, help="deadline of each request")
    add("--channels", type=int, default=1, help="gRPC channels (connections) to spread requests over")
    add("--slo", action="append", default=[], help="goodput limit, ttft:MS, tpot:MS or e2e:MS (repeatable)")
    add("--api-key", default="", help="API key (Authorization: Bearer)")
    add("--client", choices=("aio", "sync"), default="aio", help="sync: the blocking client, one request at a time")
    add("--json", dest="json_path", default="", help="also write the result as JSON to this file")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def options_from(args: argparse.Namespace) -> Options:
    fields = Options.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["slo"] = tuple(args.slo)
    return Options(**values)


def run(args: argparse.Namespace) -> int:
    options = options_from(args)
    try:
        parse_slos(list(options.slo))
        result = asyncio.run(bench(options))
    except (ValueError, OSError) as exc:
        print(f"codestream bench: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"codestream bench: {options.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print_table(result)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json_path}")
    return 0 if result["summary"]["errors"] == 0 else 1


async def bench(options: Options) -> dict[str, Any]:
    """Run the load against options.target; the result as a JSON-ready dict (config, model, summary)."""
    slos = parse_slos(list(options.slo))
    if options.client == "sync" and (options.rate > 0 or options.concurrency > 1):
        raise ValueError("--client sync sends one request at a time: leave --rate unset and --concurrency at 0 or 1")
    channels = [grpc.aio.insecure_channel(options.target) for _ in range(max(1, options.channels))]
    stubs = [api_grpc.CodeStreamStub(channel) for channel in channels]
    metadata = (("authorization", f"Bearer {options.api_key}"),) if options.api_key else ()
    try:
        # wait_for_ready: a gateway that is still starting is waited for (up to 60 s), not reported down.
        request = api.GetModelInfoRequest()
        info = await stubs[0].GetModelInfo(request, metadata=metadata, timeout=60, wait_for_ready=True)
        prompts = load_prompts(options, info.vocab_size, options.num_prompts, options.seed)
        # Warm-up prompts of their own: the run's prompts must not be in the prefix cache before they are sent.
        warmup = load_prompts(options, info.vocab_size, options.warmup, options.seed + 1) if options.warmup else []
        for i, prompt in enumerate(warmup):
            await one_request(stubs[0], build_request(options, prompt, i), options, metadata)
        # The load generator's own stops show in its latencies: what exists before the load (prompts, earlier
        # results) is frozen, so that a full collection walks only what the load makes (a 274 ms pause in W1
        # before this, on the H100 host), and the pauses that remain are reported.
        gc.collect()
        gc.freeze()
        try:
            with gc_pauses.PauseLog() as client_gc:
                if options.client == "sync":
                    outcomes = await asyncio.to_thread(send_one_by_one, prompts, options, metadata)
                else:
                    outcomes = await send_all(stubs, prompts, options, metadata, random.Random(options.seed))
        finally:
            gc.unfreeze()
    finally:
        for channel in channels:
            await channel.close()
    return {
        "config": asdict(options),
        "model": {"model_id": info.model_id, "max_model_len": info.max_model_len, "vocab_size": info.vocab_size},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "client": {"python": platform.python_version(), "grpcio": grpc.__version__, "host": platform.node()},
        "summary": summarize(outcomes, slos) | {"client_gc": client_gc.summary()},
    }


async def send_all(
    stubs: list[api_grpc.CodeStreamStub],
    prompts: list[Prompt],
    options: Options,
    metadata: tuple,
    rng: random.Random,
) -> list[Outcome]:
    """Send every request, paced by --rate and capped by --concurrency; their outcomes in send order."""
    slots = asyncio.Semaphore(options.concurrency) if options.concurrency > 0 else None
    bar = tqdm(total=options.num_prompts, unit="req", disable=not options.progress, file=sys.stderr)
    tokens = 0

    async def send(i: int) -> Outcome:
        nonlocal tokens
        try:
            request = build_request(options, prompts[i % len(prompts)], options.warmup + i)
            outcome = await one_request(stubs[i % len(stubs)], request, options, metadata)
        finally:
            if slots is not None:
                slots.release()
        tokens += outcome.output_tokens
        bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
        bar.update()
        return outcome

    tasks: list[asyncio.Task[Outcome]] = []
    for i in range(options.num_prompts):
        if options.rate > 0 and i:
            await asyncio.sleep(rng.expovariate(options.rate))
        if slots is not None:
            await slots.acquire()
        tasks.append(asyncio.create_task(send(i)))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        bar.close()


def send_one_by_one(prompts: list[Prompt], options: Options, metadata: tuple) -> list[Outcome]:
    """--client sync: each request in turn through the blocking client (--rate and --concurrency unused)."""
    single_thread = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    with grpc.insecure_channel(options.target, options=single_thread) as channel:
        stub = api_grpc.CodeStreamStub(channel)
        outcomes = []
        for i in tqdm(range(options.num_prompts), unit="req", disable=not options.progress, file=sys.stderr):
            request = build_request(options, prompts[i % len(prompts)], options.warmup + i)
            outcome = Outcome(sent=time.perf_counter())
            try:
                for event in stub.GenerateStream(request, metadata=metadata, timeout=options.timeout_s):
                    outcome.observe(event, time.perf_counter())
            except grpc.RpcError as exc:
                outcome.status, outcome.error = exc.code().name, exc.details() or ""
            outcome.ended = time.perf_counter()
            outcomes.append(outcome)
        return outcomes


def build_request(options: Options, prompt: Prompt, index: int) -> api.GenerateRequest:
    request = api.GenerateRequest(
        stopping=api.StoppingCriteria(max_new_tokens=options.output_len, ignore_eos=options.ignore_eos)
    )
    if options.temperature > 0:
        request.sampling.do_sample = True
        request.sampling.temperature = options.temperature
        request.sampling.seed = options.seed + index
    if prompt.token_ids:
        request.prompt_token_ids.ids.extend(prompt.token_ids)
    else:
        request.prompt = prompt.text
    return request


async def one_request(
    stub: api_grpc.CodeStreamStub, request: api.GenerateRequest, options: Options, metadata: tuple
) -> Outcome:
    """Stream one request; what its client saw, errors included (a failed request never raises)."""
    outcome = Outcome(sent=time.perf_counter())
    try:
        async for event in stub.GenerateStream(request, metadata=metadata, timeout=options.timeout_s):
            outcome.observe(event, time.perf_counter())
    except grpc.aio.AioRpcError as exc:
        outcome.status, outcome.error = exc.code().name, exc.details() or ""
    outcome.ended = time.perf_counter()
    return outcome


def load_prompts(options: Options, vocab_size: int, count: int, seed: int) -> list[Prompt]:
    """--prompts' file, or `count` random prompts (lengths, then ids, from random.Random(seed))."""
    if options.prompts:
        path = SHIPPED_PROMPTS.get(options.prompts, Path(options.prompts))
        prompts = [Prompt(text=json.loads(line)["prompt"]) for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {path}: no prompts")
        return prompts
    low, _, high = options.input_len.partition(":")
    low_len, high_len = int(low), int(high or low)
    if not 1 <= low_len <= high_len:
        raise ValueError(f"--input-len {options.input_len!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    rng = random.Random(seed)
    lengths = [rng.randint(low_len, high_len) for _ in range(count)]
    return [Prompt(token_ids=tuple(rng.randrange(FIRST_RANDOM_ID, vocab_size) for _ in range(n))) for n in lengths]
