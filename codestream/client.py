"""`codestream generate`: stream a completion to stdout as it arrives."""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from protos import api, api_grpc


def build_request(args: argparse.Namespace) -> api.GenerateRequest:
    request = api.GenerateRequest(prompt=args.prompt)
    if args.request_id:
        request.request_id = args.request_id
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
        request.sampling.do_sample = args.temperature > 0
    if args.do_sample is not None:
        request.sampling.do_sample = args.do_sample
    if args.top_p is not None:
        request.sampling.top_p = args.top_p
    if args.top_k is not None:
        request.sampling.top_k = args.top_k
    if args.seed is not None:
        request.sampling.seed = args.seed
    if args.max_new_tokens is not None:
        request.stopping.max_new_tokens = args.max_new_tokens
    request.stopping.stop.extend(args.stop or [])
    request.stopping.ignore_eos = args.ignore_eos
    request.response.return_full_text = args.full_text
    request.response.return_token_ids = args.json
    return request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--target", default="localhost:50051", help="gateway host:port")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="> 0 samples (sets do_sample); 0 is greedy")
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--full-text", action="store_true", help="print the prompt before the completion")
    parser.add_argument("--request-id", default="")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of the call, seconds")
    parser.add_argument("--json", action="store_true", help="print every event as a JSON line")


def run(args: argparse.Namespace) -> int:
    request = build_request(args)
    start = time.perf_counter()
    first_token = None
    with grpc.insecure_channel(args.target) as channel:
        stub = api_grpc.CodeStreamStub(channel)
        try:
            for event in stub.GenerateStream(request, timeout=args.timeout):
                if args.json:
                    print(json.dumps(MessageToDict(event)), flush=True)
                    continue
                if event.HasField("tokens"):
                    first_token = first_token or time.perf_counter()
                    sys.stdout.write(event.tokens.text)
                    sys.stdout.flush()
                elif event.HasField("finished"):
                    f = event.finished
                    elapsed = time.perf_counter() - start
                    ttft = (first_token - start) * 1000 if first_token else float("nan")
                    print(
                        f"\n[{api.StopReason.Name(f.stop_reason).removeprefix('STOP_REASON_').lower()}: "
                        f"{f.generated_tokens} tokens in {elapsed:.2f}s, first token {ttft:.0f} ms, seed {f.seed}]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
