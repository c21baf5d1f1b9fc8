"""The whole path: gRPC client -> gateway -> Redis stream -> worker + engine -> Redis pub/sub -> client.

Real Redis-protocol server (started by the tests on a free port), real gRPC server on localhost, the
tiny demo Llama (or hand-wired ones, where the test needs to know the tokens in advance)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from codestream.client import seqs
from protos import api
from tests.conftest import running_stack
from tests.streams import check_stream_shape, collect, greedy_request, make_prompts
from worker.engine import EngineConfig, LLMEngine, SamplingParams


async def test_fifty_concurrent_streams_each_get_exactly_their_own_tokens(redis_url: str, demo_model_dir: Path):
    prompts = make_prompts(50)
    # What each prompt must produce: the engine alone, greedy (itself checked against transformers).
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_blocks=2048, max_num_seqs=64))
    for i, (prompt, n) in enumerate(prompts):
        engine.add_request(str(i), engine.tokenizer.encode(prompt).ids, SamplingParams(max_new_tokens=n))
    expected: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    expected_text = {str(i): "" for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            expected[out.request_id] += out.new_token_ids
            expected_text[out.request_id] += out.text

    async with running_stack(redis_url, demo_model_dir, worker={"max_num_seqs": 16}) as stack:
        streams = await asyncio.gather(*(collect(stack.stub, greedy_request(p, n)) for p, n in prompts))
        assert stack.worker.engine.stats().num_running == 0
    for i, events in enumerate(streams):
        ids, text, finished = check_stream_shape(events)
        assert ids == expected[str(i)], f"stream {i} got another request's tokens"
        assert text == expected_text[str(i)]
        assert finished.generated_tokens == len(ids)
        assert finished.prompt_tokens == events[0].queued.prompt_tokens
        assert finished.stop_reason in (api.STOP_REASON_LENGTH, api.STOP_REASON_EOS)
        assert finished.timings.total_ms >= finished.timings.first_token_ms >= finished.timings.queue_ms >= 0


async def test_client_disconnect_frees_its_engine_slot(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        engine = stack.worker.engine
        call = stack.stub.GenerateStream(greedy_request("def forever():", 1500, ignore_eos=True))
        received = 0
        async for event in call:
            received += event.HasField("tokens")
            if received == 3:
                break
        assert engine.stats().num_running == 1
        call.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (engine.stats().num_running or stack.worker.requests):  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # polling engine state is the point: it has no event to wait on
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.num_free_blocks == stats.num_blocks
        assert not stack.worker.requests
        assert not stack.gateway.generations.active


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt_token_ids": api.TokenIds(ids=[])}, "prompt_token_ids"),
        ({"prompt_token_ids": api.TokenIds(ids=[1, 999_999])}, "prompt_token_ids"),
        ({"prompt": "x", "request_id": "no spaces allowed"}, "request_id"),
        ({"prompt": "x", "sampling": api.SamplingParameters(temperature=-1)}, "sampling.temperature"),
        ({"prompt": "x", "sampling": api.SamplingParameters(temperature=float("nan"))}, "sampling.temperature"),
        ({"prompt": "x", "sampling": api.SamplingParameters(top_p=0)}, "sampling.top_p"),
        ({"prompt": "x", "sampling": api.SamplingParameters(top_p=1.5)}, "sampling.top_p"),
        ({"prompt": "x", "stopping": api.StoppingCriteria(max_new_tokens=0)}, "stopping.max_new_tokens"),
        ({"prompt": "x", "stopping": api.StoppingCriteria(max_new_tokens=2047)}, "stopping.max_new_tokens"),
        ({"prompt": "x", "stopping": api.StoppingCriteria(stop=["a"] * 17)}, "stopping.stop"),
        ({"prompt": "x", "stopping": api.StoppingCriteria(stop=["ok", ""])}, "stopping.stop[1]"),
        ({"prompt": "x", "stopping": api.StoppingCriteria(stop=["y" * 300])}, "stopping.stop[0]"),
        ({"prompt": "x", "response": api.ResponseOptions(logprobs=6)}, "response.logprobs"),
        ({"prompt": "word " * 3000}, "prompt"),
    ],
)
async def test_bad_input_gets_invalid_argument_naming_the_field(
    redis_url: str, demo_model_dir: Path, request_kwargs: dict, field: str
):
    async with running_stack(redis_url, demo_model_dir) as stack:
        for rpc in (stack.stub.Generate, lambda r: collect(stack.stub, r)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(api.GenerateRequest(**request_kwargs))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(f"{field}: "), info.value.details()
        # ... and the server keeps serving.
        ids, _text, finished = check_stream_shape(
            await collect(stack.stub, greedy_request("x = 1", 3, ignore_eos=True))
        )
        assert len(ids) == 3 and finished.stop_reason == api.STOP_REASON_LENGTH


async def test_model_card_request_and_the_unary_rpcs(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        stub = stack.stub
        # The Code Llama model card's request, field for field.
        request = api.GenerateRequest(
            prompt="Develop a Python function to sort a list of integers in ascending order",
            sampling=api.SamplingParameters(do_sample=True),
            response=api.ResponseOptions(return_full_text=False),
            stopping=api.StoppingCriteria(max_new_tokens=16),
        )
        response = await stub.Generate(request)
        assert response.finished.generated_tokens >= 1
        assert response.finished.seed != 0  # drawn by the server, reported back
        assert not response.generated_text.startswith("Develop")
        # The seed it reported reproduces the sample.
        request.sampling.seed = response.finished.seed
        again = await stub.Generate(request)
        assert again.generated_text == response.generated_text
        # return_full_text puts the prompt in front.
        request.response.return_full_text = True
        full = await stub.Generate(request)
        assert full.generated_text == request.prompt + response.generated_text

        info = await stub.GetModelInfo(api.GetModelInfoRequest())
        assert info.max_model_len == 2048 and info.vocab_size == 2048 and info.eos_token_id == 2
        assert info.default_sampling.top_k == 50 and not info.default_sampling.do_sample
        tokens = await stub.Tokenize(api.TokenizeRequest(text="def f():"))
        assert tokens.token_ids[0] == 1 and len(tokens.tokens) == len(tokens.token_ids)

        health = health_pb2_grpc.HealthStub(stack.channel)
        for service in ("", "codestream.v1.CodeStream"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        replies = [
            r
            async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "codestream.v1.CodeStream" in names and "grpc.health.v1.Health" in names


async def test_traceparent_reaches_the_worker_and_logs_never_hold_the_prompt(redis_url: str, demo_model_dir: Path):
    from structlog.testing import capture_logs

    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    secret_prompt = "def very_secret_function_name():"
    async with running_stack(redis_url, demo_model_dir) as stack:
        with capture_logs() as logs:
            request = greedy_request(secret_prompt, 3, ignore_eos=True)
            await collect(stack.stub, request, metadata=(("traceparent", traceparent),))
            await asyncio.sleep(0.1)
    by_event = {entry["event"]: entry for entry in logs}
    for step in ("request_accepted", "request_started", "request_finished", "request_ended"):
        assert step in by_event, f"no {step} log"
    assert by_event["request_accepted"]["traceparent"] == traceparent
    # The worker's line is in the client's trace: its traceparent, or with OpenTelemetry on (tests/test_tracing.py
    # sets a tracer provider for the process), the gateway span's, a child in the same trace.
    assert by_event["request_started"]["traceparent"].split("-")[1] == traceparent.split("-")[1]
    assert all("very_secret" not in repr(entry) for entry in logs)


async def test_infill_streams_the_middle_and_chat_needs_a_template(redis_url: str, demo_model_dir: Path):
    from gateway.prompts import infill_token_ids

    async with running_stack(redis_url, demo_model_dir) as stack:
        request = api.InfillRequest(
            prefix="def add(a, b):\n    ", suffix="\n    return c\n",
            stopping=api.StoppingCriteria(max_new_tokens=8), response=api.ResponseOptions(return_token_ids=True),
        )  # fmt: skip
        events = [e async for e in stack.stub.Infill(request)]
        ids, _text, finished = check_stream_shape(events)
        card = stack.gateway.generations.card
        eot = card.fim_ids.eot
        assert eot not in ids or finished.stop_reason == api.STOP_REASON_EOS
        assert events[0].queued.prompt_tokens == len(infill_token_ids(card, request.prefix, request.suffix, False))
        # The demo model has no chat template: a clear refusal, naming what to use instead.
        chat = api.ChatRequest(messages=[api.ChatMessage(role="user", content="hi")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [e async for e in stack.stub.Chat(chat)]
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "chat template" in info.value.details()
        bad = api.InfillRequest(prefix="x", suffix="y", truncate_prompt=True)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [e async for e in stack.stub.Infill(bad)]
        assert info.value.details().startswith("truncate_prompt: ")


async def test_full_sampling_set_and_logprobs_over_grpc(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        request = api.GenerateRequest(
            prompt="def sort(xs):",
            sampling=api.SamplingParameters(
                do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, typical_p=0.95, seed=11,
                repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={5: -100.0},
            ),
            stopping=api.StoppingCriteria(max_new_tokens=12, min_new_tokens=12, stop_token_ids=[2]),
            response=api.ResponseOptions(logprobs=3, prompt_logprobs=True, return_token_ids=True),
        )  # fmt: skip
        first = [e async for e in stack.stub.GenerateStream(request)]
        again = [e async for e in stack.stub.GenerateStream(request)]
    ids, _text, finished = check_stream_shape(first)
    assert ids == check_stream_shape(again)[0], "same seed, same tokens"
    assert len(ids) == 12 and 5 not in ids and finished.seed == 11
    chunks = [e.tokens for e in first[1:-1]]
    assert len(chunks[0].prompt_logprobs) == first[0].queued.prompt_tokens - 1
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert all(len(lp.top) == 3 and lp.rank >= 1 and lp.logprob <= 0 for c in chunks for lp in c.logprobs)


async def test_n_samples_stream_with_their_index(redis_url: str, demo_model_dir: Path):
    async with running_stack(redis_url, demo_model_dir) as stack:
        request = api.GenerateRequest(
            prompt="def parse(text):",
            sampling=api.SamplingParameters(do_sample=True, temperature=1.0, seed=3, n=3),
            stopping=api.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
            response=api.ResponseOptions(return_token_ids=True),
        )
        events = [e async for e in stack.stub.GenerateStream(request)]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Generate(request)
        assert info.value.details().startswith("sampling.n: ")
    assert seqs(events) == list(range(events[-1].seq + 1))
    finished = [e for e in events if e.HasField("finished")]
    assert sorted(e.index for e in finished) == [0, 1, 2] and events[-1].HasField("finished")
    per_index: dict[int, list[int]] = {}
    for e in events:
        if e.HasField("tokens"):
            per_index.setdefault(e.index, []).extend(e.tokens.token_ids)
    assert all(len(per_index[i]) == 6 for i in range(3))
    assert len({f.finished.seed for f in finished}) == 3


async def test_chunks_waiting_for_a_slow_reader_merge_into_one_event_in_order(redis_url: str, demo_model_dir: Path):
    from gateway.validation import resolve

    request = greedy_request("def merge(a, b):", 24, ignore_eos=True)
    request.response.logprobs = 2
    async with running_stack(redis_url, demo_model_dir) as stack:
        live = await collect(stack.stub, request)  # a client that keeps up (mostly one event per step)
        generations = stack.gateway.generations
        generation = await generations.open(resolve(request, generations.card, generations.config), timeout_s=60)
        try:
            # Read nothing until the worker has sent everything: all of it waits in the inbox.
            deadline = time.monotonic() + 30
            while generation.inbox.queue.qsize() < 25 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert generation.inbox.queue.qsize() == 25  # 24 one-token chunks + Finished
            slow = [e async for e in generation.events()]
        finally:
            generation.close()
    assert len(slow) == 3  # Queued, one chunk holding all 24 steps, Finished
    merged = slow[1].tokens
    assert (slow[1].first_seq, slow[1].seq, slow[2].seq) == (1, 24, 25)
    assert seqs(slow) == seqs(live) == list(range(26))
    assert list(merged.token_ids) == [t for e in live for t in e.tokens.token_ids]
    assert merged.text == "".join(e.tokens.text for e in live)
    assert list(merged.logprobs) == [lp for e in live for lp in e.tokens.logprobs]
    assert generation.merged_events == 23
