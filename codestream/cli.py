"""The `codestream` command: serve | gateway | worker | generate | infill | chat | bench."""

from __future__ import annotations

import argparse
import asyncio
import sys

from codestream import busy_poll, grpc_io, settings
from gateway.config import GatewayConfig
from worker.config import WorkerConfig


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["gateway"]:
        grpc_io.use_iomgr()  # (before the client commands' modules below import grpc)
    parser = argparse.ArgumentParser(
        prog="codestream", description="Serve Code Llama over gRPC with Redis-queued GPU workers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="the whole stack: embedded Redis, one gateway, one worker")
    serve.add_argument("--model", default="demo", help="'demo' (default), a model directory or a hub id")
    serve.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port")
    serve.add_argument(
        "--http-port", type=int, default=None,
        help="HTTP API port (the model card's /score, OpenAI-compatible /v1/...) (env CODESTREAM_HTTP_PORT); 0: off",
    )  # fmt: skip
    serve.add_argument("--device", default="auto", help="worker device: cuda, cpu or auto")
    serve.add_argument(
        "--spin-idle-cpus", action="store_true",
        help="keep the host's idle CPUs polling, not halting (a lowest-priority spinner per CPU): 0.5-1.3 ms off "
        "each first token on a virtual machine whose idle vCPUs halt; every idle CPU at 100 %% (see idle_spin.py)",
    )  # fmt: skip

    gw = commands.add_parser("gateway", help="the gRPC gateway alone")
    settings.add_flags(gw, GatewayConfig)
    wk = commands.add_parser("worker", help="a GPU worker alone")
    settings.add_flags(wk, WorkerConfig)

    from codestream import client

    gen = commands.add_parser("generate", help="stream a completion from a running gateway")
    client.add_arguments(gen, "generate")
    fill = commands.add_parser("infill", help="stream the middle between --prefix and --suffix (Code Llama)")
    client.add_arguments(fill, "infill")
    chat = commands.add_parser("chat", help="chat with an Instruct checkpoint (its chat template)")
    client.add_arguments(chat, "chat")

    from codestream import bench

    load = commands.add_parser("bench", help="load a running gateway and measure TTFT, TPOT, ITL, throughput")
    bench.add_arguments(load)

    args = parser.parse_args(argv)
    if args.command in client.RPCS:
        return client.run(args)
    if args.command == "bench":
        return bench.run(args)

    from codestream import logs

    logs.configure(args.command)
    if args.command == "serve":
        from codestream.stack import serve_stack

        return serve_stack(args)
    if args.command == "gateway":
        from codestream.models import resolve_model
        from gateway.server import run_gateway

        config = settings.load(GatewayConfig, args)
        with asyncio.Runner(loop_factory=busy_poll.loop_factory(config.busy_poll_us)) as runner:
            runner.run(run_gateway(config, resolve_model(config.model, with_weights=False)))
        return 0
    if args.command == "worker":
        from codestream.models import resolve_model
        from worker.main import run_worker

        config = settings.load(WorkerConfig, args)
        with asyncio.Runner(loop_factory=busy_poll.loop_factory(config.busy_poll_us)) as runner:
            runner.run(run_worker(config, resolve_model(config.model)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
