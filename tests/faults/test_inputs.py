"""Bad inputs at the gRPC boundary of a real gateway process (case 10): a table of malformed requests, each
with the status and field it must get, then hypothesis-generated requests; afterwards the gateway still serves
a generation.

The strategies are built from the protobuf descriptors: every field of a request (nested messages, oneofs,
repeated fields, maps) is left unset or filled from boundary pools and hypothesis' own draws, so the fuzzer
follows the API as it grows. Runs are reproducible (a fixed seed, no example database), and a failing example
is shrunk against the real gateway before it is reported."""

from __future__ import annotations

import asyncio
import contextlib
import math
import string
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from codestream.redis_server import EmbeddedRedis, free_port
from protos import api, api_grpc
from tests.faults.conftest import PROMPTS, Cluster, Process, Reference, assert_exactly_once, generate_request

FUZZ_SEED = 20261125
FUZZ_CASES = 240
MAX_PROMPT_CHARS = 4000
VOCAB = 2048  # the demo model's
CONTEXT = 2048
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def gen(**fields: Any) -> api.GenerateRequest:
    """A valid request (short prompt, 4 new tokens) with `fields` merged in (dotted names: sampling.top_p)."""
    request = api.GenerateRequest(prompt="def f(x):\n", stopping=api.StoppingCriteria(max_new_tokens=4))
    for name, value in fields.items():
        *path, leaf = name.split(".")
        target: Message = request
        for part in path:
            target = getattr(target, part)
        if leaf == "prompt_token_ids":
            request.prompt_token_ids.ids[:] = value
        elif isinstance(value, dict):
            getattr(target, leaf).update(value)
        elif isinstance(value, list):
            getattr(target, leaf)[:] = value
        elif value is None:
            target.ClearField(leaf)
        else:
            setattr(target, leaf, value)
    return request


# (name, request, the field the INVALID_ARGUMENT message must start with)
TABLE: list[tuple[str, api.GenerateRequest, str]] = [
    ("no prompt", api.GenerateRequest(), "prompt"),
    ("empty prompt", gen(prompt=""), "prompt"),
    ("prompt too long", gen(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
    ("empty prompt_token_ids", api.GenerateRequest(prompt_token_ids=api.TokenIds()), "prompt_token_ids"),
    ("token id = vocab", gen(prompt_token_ids=[1, VOCAB]), "prompt_token_ids"),
    ("token id 2^32-1", gen(prompt_token_ids=[2**32 - 1]), "prompt_token_ids"),
    ("prompt fills the context", gen(prompt_token_ids=[5] * CONTEXT), "prompt"),
    ("request_id with a space", gen(request_id="a b"), "request_id"),
    ("request_id of 129 chars", gen(request_id="r" * 129), "request_id"),
    ("request_id non-ASCII", gen(request_id="ïd"), "request_id"),
    ("temperature < 0", gen(**{"sampling.temperature": -1.0}), "sampling.temperature"),
    ("temperature NaN", gen(**{"sampling.temperature": math.nan}), "sampling.temperature"),
    ("temperature inf", gen(**{"sampling.temperature": math.inf}), "sampling.temperature"),
    ("top_p 0", gen(**{"sampling.top_p": 0.0}), "sampling.top_p"),
    ("top_p 1.5", gen(**{"sampling.top_p": 1.5}), "sampling.top_p"),
    ("top_p NaN", gen(**{"sampling.top_p": math.nan}), "sampling.top_p"),
    ("min_p 2", gen(**{"sampling.min_p": 2.0}), "sampling.min_p"),
    ("typical_p 0", gen(**{"sampling.typical_p": 0.0}), "sampling.typical_p"),
    ("repetition_penalty 0", gen(**{"sampling.repetition_penalty": 0.0}), "sampling.repetition_penalty"),
    ("presence_penalty 3", gen(**{"sampling.presence_penalty": 3.0}), "sampling.presence_penalty"),
    ("frequency_penalty -inf", gen(**{"sampling.frequency_penalty": -math.inf}), "sampling.frequency_penalty"),
    ("logit_bias token = vocab", gen(**{"sampling.logit_bias": {VOCAB: 1.0}}), "sampling.logit_bias"),
    ("logit_bias 1000", gen(**{"sampling.logit_bias": {5: 1000.0}}), "sampling.logit_bias[5]"),
    ("logit_bias NaN", gen(**{"sampling.logit_bias": {5: math.nan}}), "sampling.logit_bias[5]"),
    ("n 0", gen(**{"sampling.n": 0}), "sampling.n"),
    ("n 10^6", gen(**{"sampling.n": 10**6}), "sampling.n"),
    ("max_new_tokens 0", gen(**{"stopping.max_new_tokens": 0}), "stopping.max_new_tokens"),
    ("max_new_tokens 2^32-1", gen(**{"stopping.max_new_tokens": 2**32 - 1}), "stopping.max_new_tokens"),
    ("prompt + max_new_tokens > context", gen(**{"stopping.max_new_tokens": CONTEXT - 2}), "stopping.max_new_tokens"),
    ("17 stop sequences", gen(**{"stopping.stop": ["s"] * 17}), "stopping.stop"),
    ("empty stop sequence", gen(**{"stopping.stop": [""]}), "stopping.stop[0]"),
    ("stop sequence of 257 chars", gen(**{"stopping.stop": ["ok", "s" * 257]}), "stopping.stop[1]"),
    ("min_new_tokens > max_new_tokens", gen(**{"stopping.min_new_tokens": 5}), "stopping.min_new_tokens"),
    ("stop token id = vocab", gen(**{"stopping.stop_token_ids": [VOCAB]}), "stopping.stop_token_ids"),
    ("logprobs 6", gen(**{"response.logprobs": 6}), "response.logprobs"),
    (
        "truncation with no room left",
        gen(truncate_prompt=True, **{"stopping.max_new_tokens": CONTEXT - 1}),
        "stopping.max_new_tokens",
    ),
]


# One stack for the module (these tests break nothing), in the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path
) -> AsyncIterator[tuple[Cluster, Process]]:
    server = EmbeddedRedis(port=free_port())
    server.start()
    cluster = Cluster(tmp_path_factory.mktemp("inputs"), demo_model_dir, server)
    failed_before = request.session.testsfailed
    try:
        worker = cluster.start_worker("worker")
        gateway = cluster.start_gateway("gateway", max_prompt_chars=MAX_PROMPT_CHARS)
        await cluster.ready(worker, gateway)
        yield cluster, gateway
    finally:
        await cluster.close()
        server.close()
        if request.session.testsfailed > failed_before:
            for process in cluster.processes:
                print(f"\n----- {process.name} (exit {process.popen.returncode}) -----\n{process.tail()}")


async def first_event_status(call: Any) -> tuple[grpc.StatusCode, str]:
    """The call's status once it is known: an error before any event, or OK as soon as the first event (Queued:
    the request was valid and accepted) arrives; then the call is cancelled, which cancels its job."""
    try:
        async for _event in call:
            call.cancel()
            return grpc.StatusCode.OK, ""
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


async def still_serving(cluster: Cluster, gateway: Process, reference: Reference) -> None:
    """The gateway process is alive, reports SERVING, and streams a whole generation."""
    assert gateway.alive, f"the gateway exited ({gateway.popen.returncode})"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        events = [e async for e in api_grpc.CodeStreamStub(channel).GenerateStream(generate_request(PROMPTS[0], 16))]
    assert_exactly_once(events, reference.tokens(PROMPTS[:1], 16)[0], "generation after the bad inputs")


async def test_bad_fields_get_invalid_argument_naming_the_field(
    stack: tuple[Cluster, Process], reference: Reference, figure: Callable[..., None]
) -> None:
    cluster, gateway = stack
    stub = cluster.stub(gateway)
    failures = []
    for name, request, field_path in TABLE:
        for rpc in ("GenerateStream", "Generate"):
            if rpc == "GenerateStream":
                code, details = await first_event_status(stub.GenerateStream(request, timeout=10))
            else:
                try:
                    await stub.Generate(request, timeout=10)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
            if code != grpc.StatusCode.INVALID_ARGUMENT or not details.startswith(f"{field_path}:"):
                failures.append(f"{rpc} {name}: {code.name} {details!r} (want INVALID_ARGUMENT {field_path}: ...)")

    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    too_long = api.TokenizeRequest(text="x" * (MAX_PROMPT_CHARS + 1))
    others: list[tuple[str, Callable[[], Any], grpc.StatusCode, str]] = [
        ("Tokenize too long", lambda: stub.Tokenize(too_long), invalid, "text:"),
        ("Cancel without id", lambda: stub.Cancel(api.CancelRequest()), invalid, "request_id:"),
        ("Resume without id", lambda: first_event_status(stub.Resume(api.ResumeRequest(), timeout=10)), invalid,
         "request_id:"),
        ("Resume unknown id", lambda: first_event_status(stub.Resume(api.ResumeRequest(request_id="nope"), timeout=10)),
         not_found, ""),
    ]  # fmt: skip
    for name, call, want, prefix in others:
        try:
            result = await call()
            code, details = result if isinstance(result, tuple) else (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        if code != want or not details.startswith(prefix):
            failures.append(f"{name}: {code.name} {details!r} (want {want.name} {prefix}...)")
    assert not failures, "\n".join(failures)
    await still_serving(cluster, gateway, reference)
    figure("table_cases", 2 * len(TABLE) + len(others))


# -- the fuzzer --------------------------------------------------------------------------------------------------

FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-7, 2.0, 100.0, 3.4e38, -3.4e38, math.nan, math.inf, -math.inf]
UINT32 = [0, 1, 2, 5, 16, 255, VOCAB - 1, VOCAB, CONTEXT - 1, CONTEXT, 4096, 65535, 2**31, 2**32 - 1]
TEXT_POOLS = [
    string.printable,
    "\x00\x01\x7f\u200b\u202e\ufeff",  # NUL, controls, zero-width space, right-to-left override, BOM
    "é€𝄞日本語🙂ꙮ",  # multi-byte and astral characters
    "▁<PRE><SUF><MID><EOT></s><s>",  # the model's special tokens, spelled out
]


def text() -> st.SearchStrategy[str]:
    """Short text from hypothesis' full alphabet or one of the pools; or text at and past the size limits."""
    pooled = st.sampled_from(TEXT_POOLS).flatmap(lambda pool: st.text(alphabet=pool, max_size=300))
    long = st.builds(
        lambda char, size: char * size,
        st.sampled_from(["x", "é", "🙂", "\x00", "▁<MID>"]),
        st.sampled_from([2000, MAX_PROMPT_CHARS, MAX_PROMPT_CHARS + 1]),
    )
    return st.one_of(st.text(max_size=64), pooled, long)


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from(FLOATS), st.floats(width=width))
    if kind == FieldDescriptor.TYPE_STRING:
        return text()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.sampled_from(UINT32), st.integers(0, 2**32 - 1))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    return st.integers(-(2**63), 2**63 - 1)


def fill(draw: st.DrawFn, message: Message, depth: int = 0) -> Message:
    """Fill `message` in place: each real oneof gets one of its fields or none; every other field is set or
    not (proto3 `optional` fields are oneofs of one, named with a leading underscore)."""
    chosen = {o.name: draw(st.sampled_from([*o.fields, None])) for o in message.DESCRIPTOR.oneofs}
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):
            if chosen[oneof.name] is not field:
                continue
        elif not draw(st.booleans()):
            continue
        with contextlib.suppress(ValueError, TypeError, OverflowError):  # values protobuf refuses: unsendable
            set_field(draw, message, field, depth)
    return message


def set_field(draw: st.DrawFn, message: Message, field: FieldDescriptor, depth: int) -> None:
    target = getattr(message, field.name)
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        if value_field.message_type is not None:
            for key in draw(st.lists(scalar(key_field), max_size=3)):
                fill(draw, target[key], depth + 1)
        else:
            size = draw(st.sampled_from([0, 1, 3, 20]))
            key, value = scalar(key_field), scalar(value_field)
            target.update(draw(st.dictionaries(key, value, min_size=min(size, 3), max_size=size)))
            if size == 20:  # many entries, cheaply: consecutive keys (token ids) with one value
                for k in range(size):
                    target[k] = draw(value)
    elif field.is_repeated:
        count = draw(st.sampled_from([0, 1, 2, 5, 17, 300]))
        if field.message_type is not None:
            for _ in range(min(count, 5)):
                fill(draw, target.add(), depth + 1)
        elif count <= 5:
            target.extend(draw(st.lists(scalar(field), min_size=count, max_size=count)))
        else:  # long lists: one drawn value repeated (keeps each example's draws small)
            target.extend([draw(scalar(field))] * count)
    elif field.message_type is not None:
        if depth < 3:
            target.SetInParent()
            fill(draw, target, depth + 1)
    else:
        setattr(message, field.name, draw(scalar(field)))


@st.composite
def requests(draw: st.DrawFn, cls: type[Message]) -> Message:
    return fill(draw, cls())


STREAMING = {"GenerateStream": api.GenerateRequest, "Infill": api.InfillRequest, "Chat": api.ChatRequest}


async def test_fuzzed_requests_never_get_unknown_or_internal_and_the_gateway_keeps_serving(
    stack: tuple[Cluster, Process], reference: Reference, figure: Callable[..., None]
) -> None:
    cluster, gateway = stack
    stub = cluster.stub(gateway)
    served = {}
    for rpc in STREAMING:  # RPCs not implemented yet answer UNIMPLEMENTED: fuzz the others
        code, _ = await first_event_status(getattr(stub, rpc)(STREAMING[rpc](), timeout=10))
        served[rpc] = code != grpc.StatusCode.UNIMPLEMENTED

    def short_generate(request: api.GenerateRequest) -> tuple[str, Message]:
        """Generate waits for the whole generation: keep the fuzzed request short (it may still be invalid)."""
        if 0 < request.stopping.max_new_tokens <= CONTEXT:
            request.stopping.max_new_tokens = 1 + request.stopping.max_new_tokens % 3
        return "Generate", request

    cases = st.one_of(
        *(st.tuples(st.just(rpc), requests(cls)) for rpc, cls in STREAMING.items() if served[rpc]),
        requests(api.GenerateRequest).map(short_generate),
        st.tuples(st.just("Tokenize"), requests(api.TokenizeRequest)),
        st.tuples(st.just("Resume"), requests(api.ResumeRequest)),
        st.tuples(st.just("Cancel"), requests(api.CancelRequest)),
    )

    async def call(rpc: str, request: Message) -> tuple[grpc.StatusCode, str]:
        method = getattr(stub, rpc)
        if rpc in STREAMING or rpc == "Resume":
            return await first_event_status(method(request, timeout=15))
        try:
            await method(request, timeout=15)
            return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""

    loop = asyncio.get_running_loop()
    outcomes: list[tuple[str, grpc.StatusCode, str]] = []

    @seed(FUZZ_SEED)
    @settings(
        max_examples=FUZZ_CASES, database=None, deadline=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
    @given(case=cases)
    def check(case: tuple[str, Message]) -> None:
        rpc, request = case
        # hypothesis drives the examples from a thread; the calls run on the test's event loop.
        code, details = asyncio.run_coroutine_threadsafe(call(rpc, request), loop).result(timeout=30)
        outcomes.append((rpc, code, details))
        assert code not in NEVER, f"{rpc}: {code.name} {details[:200]!r}"
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc} hung until its deadline: {details[:200]!r}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert ":" in details, f"{rpc}: INVALID_ARGUMENT without a field path: {details[:120]!r}"

    started = time.monotonic()
    await asyncio.to_thread(check)
    elapsed = time.monotonic() - started
    by_code: dict[str, int] = {}
    for _rpc, code, _details in outcomes:
        by_code[code.name] = by_code.get(code.name, 0) + 1
    await still_serving(cluster, gateway, reference)

    figure("hypothesis_seed", FUZZ_SEED)
    figure("fuzzed_calls", len(outcomes))
    figure("fuzzed_rpcs", ",".join([r for r in STREAMING if served[r]] + ["Generate", "Tokenize", "Resume", "Cancel"]))
    figure("fuzz_statuses", " ".join(f"{k}={v}" for k, v in sorted(by_code.items())))
    figure("fuzz_wall_time", elapsed, "s")


RAW_CASES = [
    ("garbage bytes", b"\xff\xff\xff\xff\x0f"),
    ("truncated field", b"\x0a\x10def"),  # prompt (field 1), length 16, 3 bytes follow
    ("invalid UTF-8 in prompt", b"\x0a\x03\xff\xfe\xfd"),
]


async def test_undecodable_requests_get_invalid_argument(stack: tuple[Cluster, Process], reference: Reference) -> None:
    """Bytes that do not decode as a GenerateRequest (a string field that is not UTF-8, a truncated field)."""
    cluster, gateway = stack
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_stream(
            "/codestream.v1.CodeStream/GenerateStream",
            request_serializer=lambda raw: raw,
            response_deserializer=api.GenerateEvent.FromString,
        )
        got = {name: await first_event_status(call(raw, timeout=10)) for name, raw in RAW_CASES}
    for name, (code, details) in got.items():
        print(f"{name}: {code.name} {details!r}")
    await still_serving(cluster, gateway, reference)
    expected = (grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid codestream.v1.GenerateRequest message")
    assert all(outcome == expected for outcome in got.values()), got
