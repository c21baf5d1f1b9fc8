"""`codestream generate | infill | chat`: stream a completion to stdout as it arrives."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from protos import api, api_grpc


def build_request(args: argparse.Namespace) -> api.GenerateRequest | api.InfillRequest | api.ChatRequest:
    """The request for the command (generate, infill, chat), with the options they share."""
    if args.command == "infill":
        order = api.InfillRequest.ORDER_SUFFIX_PREFIX_MIDDLE if args.suffix_first else 0
        request = api.InfillRequest(prefix=args.prefix, suffix=args.suffix, order=order)
    elif args.command == "chat":
        messages = [api.ChatMessage(role="system", content=args.system)] if args.system else []
        for i, content in enumerate(args.message):
            messages.append(api.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=content))
        request = api.ChatRequest(messages=messages)
    else:
        request = api.GenerateRequest(prompt=args.prompt)
    if args.request_id:
        request.request_id = args.request_id
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
        request.sampling.do_sample = args.temperature > 0
    if args.do_sample is not None:
        request.sampling.do_sample = args.do_sample
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed", "n"):
        if getattr(args, name) is not None:
            setattr(request.sampling, name, getattr(args, name))
    if args.max_new_tokens is not None:
        request.stopping.max_new_tokens = args.max_new_tokens
    request.stopping.stop.extend(args.stop or [])
    request.stopping.ignore_eos = args.ignore_eos
    request.response.return_full_text = args.full_text
    request.response.return_token_ids = args.json
    return request


RPCS = {"generate": "GenerateStream", "infill": "Infill", "chat": "Chat"}


def covered_seqs(event: api.GenerateEvent) -> range:
    """The worker's seqs an event stands for: one, or several when the gateway merged token chunks that were
    waiting for a slow reader. A stream's events cover 0 (Queued), 1, 2, ... with no gap and no repeat."""
    return range(event.first_seq or event.seq, event.seq + 1)


def seqs(events: list[api.GenerateEvent]) -> list[int]:
    """Every seq a list of events covers, in order."""
    return [s for event in events for s in covered_seqs(event)]


def add_arguments(parser: argparse.ArgumentParser, command: str = "generate") -> None:
    if command == "infill":
        parser.add_argument("--prefix", required=True, help="code before the hole")
        parser.add_argument("--suffix", default="", help="code after the hole")
        parser.add_argument("--suffix-first", action="store_true", help="suffix-prefix-middle order")
    elif command == "chat":
        parser.add_argument("message", nargs="+", help="the conversation: user, assistant, user... (last: user)")
        parser.add_argument("--system", default="", help="system prompt")
    else:
        parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--target", default="localhost:50051", help="gateway host:port")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="> 0 samples (sets do_sample); 0 is greedy")
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("-n", type=int, dest="n", help="number of samples (streamed with their index)")
    parser.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    if command != "infill":
        parser.add_argument("--full-text", action="store_true", help="print the prompt before the completion")
    else:
        parser.set_defaults(full_text=False)
    parser.add_argument("--request-id", default="")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of the call, seconds")
    parser.add_argument("--json", action="store_true", help="print every event as a JSON line")
    security = parser.add_argument_group("authentication and TLS")
    security.add_argument(
        "--api-key",
        default=None,
        help="API key, sent as 'authorization: Bearer <key>' (env CODESTREAM_API_KEY, which keeps it out of ps)",
    )
    security.add_argument("--tls", action="store_true", help="use TLS, verifying the gateway with the system's CAs")
    security.add_argument(
        "--tls-ca-file", default="", help="PEM CA that signed the gateway's certificate (implies --tls)"
    )
    security.add_argument(
        "--tls-cert-file", default="", help="PEM client certificate, for a gateway that requires mTLS"
    )
    security.add_argument("--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    security.add_argument("--tls-server-name", default="", help="name to verify in the gateway's certificate")


def api_key(args: argparse.Namespace) -> str:
    return args.api_key if args.api_key is not None else os.environ.get("CODESTREAM_API_KEY", "")


def call_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS credentials: the gateway verified against `ca_file` (or the system's CAs), and a client
    certificate when both `cert_file` and `key_file` are given (mTLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both --tls-cert-file and --tls-key-file")

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file)
    )


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A secure channel when TLS is asked for (--tls, a CA or a client certificate), else a plaintext one."""
    if not (args.tls or args.tls_ca_file or args.tls_cert_file or args.tls_key_file):
        return grpc.insecure_channel(args.target)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    credentials = channel_credentials(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    return grpc.secure_channel(args.target, credentials, options=options)


def run(args: argparse.Namespace) -> int:
    request = build_request(args)
    start = time.perf_counter()
    first_token = None
    try:
        channel = open_channel(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = api_grpc.CodeStreamStub(channel)
        try:
            rpc = getattr(stub, RPCS[args.command])
            for event in rpc(request, timeout=args.timeout, metadata=call_metadata(api_key(args))):
                if args.json:
                    print(json.dumps(MessageToDict(event)), flush=True)
                    continue
                if event.HasField("tokens"):
                    first_token = first_token or time.perf_counter()
                    if getattr(args, "n", None) and args.n > 1:
                        sys.stdout.write(f"[{event.index}]")
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
