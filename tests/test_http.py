"""The HTTP front door (gateway/http/): the model card's POST /score and the OpenAI-compatible /v1 routes, on
a real gateway + worker over real Redis, driven by plain HTTP (aiohttp) and by the official `openai` client.

What is compared against the gRPC API is compared token for token: the HTTP routes are a second door onto
the same generations, so the same request must give the same text through either door.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from codestream import settings
from codestream.redis_server import free_port
from gateway.config import GatewayConfig
from gateway.server import Gateway
from protos import api
from tests.conftest import Stack, running_stack, start_test_gateway
from tests.test_prompts import CODE_LLAMA_INSTRUCT_TEMPLATE, added_token, copy_model

# The Code Llama model card's sample request (max_new_tokens lowered: a random tiny model rambles on).
CARD_PROMPT = "Develop a Python function to sort a list of integers in ascending order"
CARD_PARAMETERS = {"top_p": 0.9, "temperature": 0.6, "max_new_tokens": 32, "do_sample": True, "return_full_text": False}
KEY = "kh-1b2c3d4e5f6a7b8c"
ERROR_FIELDS = {"message", "type", "param", "code"}


@contextlib.asynccontextmanager
async def http_stack(redis_url: str, model_dir: Path, **gateway: Any) -> AsyncIterator[tuple[Stack, str]]:
    async with running_stack(redis_url, model_dir, gateway={"http_port": free_port(), **gateway}) as stack:
        yield stack, f"http://127.0.0.1:{stack.gateway.http_port}"


@contextlib.asynccontextmanager
async def http_gateway(redis_url: str, model_dir: Path, **settings: Any) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway alone (no worker): enough for what is decided before a job is queued."""
    gateway = await start_test_gateway(redis_url, model_dir, "thttp", http_port=free_port(), **settings)
    try:
        yield gateway, f"http://127.0.0.1:{gateway.http_port}"
    finally:
        await gateway.stop(grace_s=0)


def client(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def model_id(stack: Stack | Gateway) -> str:
    gateway = stack.gateway if isinstance(stack, Stack) else stack
    return gateway.generations.card.model_id


async def grpc_text(stack: Stack, call: str, request: Any) -> tuple[str, api.GenerateEvent]:
    """The text a gRPC streaming call produces, and its first (Queued) event."""
    events = [e async for e in getattr(stack.stub, call)(request)]
    assert events[-1].HasField("finished"), events[-1]
    return "".join(e.tokens.text for e in events if e.HasField("tokens")), events[0]


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def assert_error(status: int, body: Any, expected_status: int, param: str | None, text: str = "") -> dict[str, Any]:
    assert status == expected_status, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    error = body["error"]
    assert error["param"] == param, error
    assert text in error["message"], error
    kind = "rate_limit_error" if expected_status == 429 else "invalid_request_error"
    assert error["type"] == (kind if expected_status < 500 else "server_error"), error
    return error


@pytest.fixture(scope="module")
def instruct_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (weights too) as an Instruct checkpoint: Code Llama Instruct's chat template."""
    return copy_model(
        demo_model_dir, tmp_path_factory.mktemp("http") / "instruct", chat_template=CODE_LLAMA_INSTRUCT_TEMPLATE,
        bos_token=added_token("<s>"), eos_token=added_token("</s>"), unk_token=added_token("<unk>"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- /score


async def test_score_answers_the_model_card_sample_request_in_its_shape(redis_url: str, demo_model_dir: Path):
    async with http_stack(redis_url, demo_model_dir) as (stack, url), aiohttp.ClientSession() as session:
        body = {"input_data": {"input_string": [CARD_PROMPT], "parameters": CARD_PARAMETERS}}
        async with session.post(f"{url}/score", json=body) as response:
            assert response.status == 200 and response.content_type == "application/json"
            answer = await response.json()
        assert isinstance(answer, list) and len(answer) == 1 and set(answer[0]) == {"0"}
        assert isinstance(answer[0]["0"], str) and not answer[0]["0"].startswith(CARD_PROMPT)

        # Parameters keep their meaning: with a seed, the text is the gRPC API's for the same request.
        seeded = {**CARD_PARAMETERS, "seed": 7, "max_new_tokens": 12}
        status, answer = await post(session, f"{url}/score", {"input_data": {"input_string": [CARD_PROMPT],
                                                                             "parameters": seeded}})  # fmt: skip
        request = api.GenerateRequest(
            prompt=CARD_PROMPT, sampling=api.SamplingParameters(do_sample=True, temperature=0.6, top_p=0.9, seed=7),
            stopping=api.StoppingCriteria(max_new_tokens=12),
        )  # fmt: skip
        expected, _ = await grpc_text(stack, "GenerateStream", request)
        assert status == 200 and answer == [{"0": expected}]

        # One entry per input string, in order; return_full_text (the pipeline's default) puts the prompt first.
        prompts = ["def add(a, b):", "class Stack:"]
        greedy = {"do_sample": False, "max_new_tokens": 6}
        status, answer = await post(session, f"{url}/score", {"input_data": {"input_string": prompts,
                                                                             "parameters": greedy}})  # fmt: skip
        assert status == 200 and len(answer) == 2
        for prompt, entry in zip(prompts, answer, strict=True):
            request = api.GenerateRequest(prompt=prompt, stopping=api.StoppingCriteria(max_new_tokens=6))
            expected, _ = await grpc_text(stack, "GenerateStream", request)
            assert entry == {"0": prompt + expected}


async def test_score_refuses_bad_json_and_unknown_parameters_naming_the_field(redis_url: str, demo_model_dir: Path):
    score = "/score"
    cases: list[tuple[Any, str | None, str]] = [
        (b'{"input_data": ', None, "not valid JSON"),
        ([1, 2], "body", "must be a JSON object"),
        ({"input_data": {"input_string": ["x"], "parameters": {"tempreature": 0.5}}},
         "input_data.parameters.tempreature", "unknown parameter"),
        ({"input_data": {"input_string": ["x"], "parameters": {"num_return_sequences": 2}}},
         "input_data.parameters.num_return_sequences", "/v1/completions has n"),
        ({"input_data": {"input_string": ["x"], "parameters": {"max_new_tokens": "many"}}},
         "input_data.parameters.max_new_tokens", "must be an integer"),
        ({"input_data": {"input_string": ["x"], "parameters": {"top_p": 1.5}}}, "input_data.parameters.top_p", ""),
        ({"input_data": {"input_string": ["x"], "parameters": {"stop": ["ok", ""]}}},
         "input_data.parameters.stop[1]", ""),
        ({"input_data": {"parameters": {}}}, "input_data.input_string", "required"),
        ({"input_data": {"input_string": ["ok", 3]}}, "input_data.input_string[1]", "must be a string"),
        ({"input_data": {"input_string": ["ok", ""]}}, "input_data.input_string[1]", ""),
        ({"input_data": {"input_string": ["x"]}, "extra": 1}, "extra", "unknown parameter"),
        ({"input_string": ["x"]}, "input_string", "unknown parameter"),
    ]  # fmt: skip
    async with http_gateway(redis_url, demo_model_dir) as (gateway, url), aiohttp.ClientSession() as session:
        for body, param, text in cases:
            status, answer = await post(session, url + score, body)
            assert_error(status, answer, 400, param, text)
            if param is not None:
                assert answer["error"]["message"].startswith(param + ": "), answer
        assert not gateway.generations.active


# ---------------------------------------------------------------------------------------- OpenAI client


async def test_openai_client_streams_a_completion_and_an_infill_unchanged(redis_url: str, demo_model_dir: Path):
    async with http_stack(redis_url, demo_model_dir) as (stack, url):
        oai, model = client(url), model_id(stack)
        prompt = "def fibonacci(n):"
        stream = await oai.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        request = api.GenerateRequest(prompt=prompt, stopping=api.StoppingCriteria(max_new_tokens=12, ignore_eos=True))
        expected, queued = await grpc_text(stack, "GenerateStream", request)
        assert text == expected and text
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1, "streamed, not sent at once"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
        assert chunks[-1].usage.prompt_tokens == queued.queued.prompt_tokens
        whole = await oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})  # fmt: skip
        assert whole.choices[0].text == expected and whole.object == "text_completion"
        assert whole.usage is not None and whole.usage.total_tokens == queued.queued.prompt_tokens + 12

        # suffix: Code Llama infilling, the same middle as the Infill RPC.
        prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
        stream = await oai.completions.create(model=model, prompt=prefix, suffix=suffix, max_tokens=10, temperature=0,
                                              stream=True)  # fmt: skip
        middle = "".join([c.choices[0].text async for c in stream if c.choices])
        infill = api.InfillRequest(prefix=prefix, suffix=suffix, stopping=api.StoppingCriteria(max_new_tokens=10))
        expected, _ = await grpc_text(stack, "Infill", infill)
        assert middle == expected

        # On the wire: server-sent events, every one `data: {json}`, the last `data: [DONE]`.
        async with aiohttp.ClientSession() as session:
            body = {"model": model, "prompt": prompt, "max_tokens": 4, "stream": True}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                raw = (await response.read()).decode()
        events = [e for e in raw.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        assert all(json.loads(e.removeprefix("data: "))["object"] == "text_completion" for e in events[:-1])

        models = await oai.models.list()
        assert [m.id for m in models.data] == [model]
    assert not stack.gateway.generations.active


async def test_openai_client_chats_with_an_instruct_checkpoint(redis_url: str, instruct_model_dir: Path):
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Reverse a list."}]
    async with http_stack(redis_url, instruct_model_dir) as (stack, url):
        oai, model = client(url), model_id(stack)
        stream = await oai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        request = api.ChatRequest(
            messages=[api.ChatMessage(**m) for m in messages],
            stopping=api.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
        )
        expected, _ = await grpc_text(stack, "Chat", request)
        assert text == expected and text
        assert chunks[-1].choices[0].finish_reason == "length"

        whole = await oai.chat.completions.create(
            model=model, messages=messages, max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        choice = whole.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 8 == whole.usage.completion_tokens
        assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in choice.logprobs.content)


# ---------------------------------------------------------------------------------------------- errors


async def test_errors_have_openai_shape_and_status(redis_url: str, demo_model_dir: Path):
    async with http_gateway(redis_url, demo_model_dir) as (gateway, url), aiohttp.ClientSession() as session:
        model = model_id(gateway)
        ok = {"model": model, "prompt": "x"}
        completion_cases: list[tuple[dict[str, Any], int, str | None, str]] = [
            ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
            ({"prompt": "x"}, 400, "model", "required"),
            ({"model": model}, 400, "prompt", "required"),
            (ok | {"temperature": "hot"}, 400, "temperature", "must be a number"),
            (ok | {"temperature": -1}, 400, "temperature", ""),
            (ok | {"top_p": 1.5}, 400, "top_p", ""),
            (ok | {"max_tokens": 5000}, 400, "max_tokens", ""),
            (ok | {"stop": ["ok", ""]}, 400, "stop[1]", ""),
            (ok | {"n": 99}, 400, "n", ""),
            (ok | {"logprobs": 6}, 400, "logprobs", ""),
            (ok | {"frobnicate": True}, 400, "frobnicate", "unknown parameter"),
            (ok | {"prompt": ["fine", ""]}, 400, "prompt[1]", ""),
            (ok | {"suffix": "y", "echo": True}, 400, "echo", ""),
        ]
        for body, status_expected, param, text in completion_cases:
            status, answer = await post(session, f"{url}/v1/completions", body)
            assert_error(status, answer, status_expected, param, text)
        assert (await post(session, f"{url}/v1/completions", ok | {"model": "gpt-4"}))[1]["error"]["code"] == (
            "model_not_found"
        )
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        # The demo model is a base checkpoint: no chat template.
        status, answer = await post(session, f"{url}/v1/chat/completions", chat)
        assert assert_error(status, answer, 400, "model", "chat template")["code"] == "model_not_supported"
        status, answer = await post(session, f"{url}/v1/chat/completions", chat | {"tools": []})
        assert_error(status, answer, 400, "tools", "not supported")
        status, answer = await post(session, f"{url}/v1/chat/completions", chat | {"messages": [{"role": "user"}]})
        assert_error(status, answer, 400, "messages[0].content", "")
        status, answer = await post(session, f"{url}/v1/completions", b"not json")
        assert_error(status, answer, 400, None, "not valid JSON")
        async with session.get(f"{url}/v1/nothing-here") as response:
            assert_error(response.status, await response.json(), 404, None)
        async with session.get(f"{url}/v1/completions") as response:
            assert_error(response.status, await response.json(), 405, None)

        # The official client raises its own exception types from these.
        with pytest.raises(openai.NotFoundError) as info:
            await client(url).completions.create(model="gpt-4", prompt="x")
        assert info.value.code == "model_not_found" and info.value.param == "model"
        with pytest.raises(openai.BadRequestError) as bad:
            await client(url).completions.create(model=model, prompt="x", top_p=1.5)
        assert bad.value.param == "top_p"
        assert not gateway.generations.active


async def test_a_client_sets_its_own_deadline_with_a_header(redis_url: str, demo_model_dir: Path):
    # No worker runs: the job waits in the queue until the deadline ends it.
    settings = {"request_timeout_s": 30.0, "deadline_grace_s": 0.1}
    gateway_alone = http_gateway(redis_url, demo_model_dir, **settings)
    async with gateway_alone as (gateway, url), aiohttp.ClientSession() as session:
        body = {"model": model_id(gateway), "prompt": "def f():", "max_tokens": 4}
        for bad in ("soon", "0", "-1", "nan", "inf"):
            status, answer = await post(session, f"{url}/v1/completions", body, {"X-Request-Timeout": bad})
            assert_error(status, answer, 400, "X-Request-Timeout", "seconds")
        started = time.monotonic()
        status, answer = await post(session, f"{url}/v1/completions", body, {"X-Request-Timeout": "0.5"})
        elapsed = time.monotonic() - started
        assert_error(status, answer, 504, None)
        assert answer["error"]["code"] == "deadline_exceeded"
        assert 0.5 <= elapsed < 5, elapsed  # the client's 0.5 s, not the gateway's 30 s
        assert not gateway.generations.active


async def test_api_keys_and_admission_apply_as_on_grpc(redis_url: str, demo_model_dir: Path, tmp_path: Path):
    keys = tmp_path / "api-keys"
    keys.write_text(f"tenant-a:{KEY}\n")
    async with http_stack(redis_url, demo_model_dir, api_keys_file=str(keys)) as (stack, url):
        body = {"model": model_id(stack), "prompt": "def f():", "max_tokens": 3}
        async with aiohttp.ClientSession() as session:
            status, answer = await post(session, f"{url}/v1/completions", body)
            assert assert_error(status, answer, 401, None, "missing API key")["code"] == "missing_api_key"
            status, answer = await post(session, f"{url}/score", {"input_data": {"input_string": ["x"]}})
            assert_error(status, answer, 401, None, "missing API key")
            async with session.get(f"{url}/v1/models") as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
            async with session.get(f"{url}/health") as response:  # probes carry no key
                assert response.status == 200
            # x-api-key as on gRPC, besides OpenAI's Authorization: Bearer.
            status, answer = await post(session, f"{url}/v1/completions", body, headers={"x-api-key": KEY})
            assert status == 200 and answer["usage"]["completion_tokens"] >= 1
        with pytest.raises(openai.AuthenticationError) as info:
            await client(url, "wrong-key").completions.create(**body)
        assert info.value.code == "invalid_api_key"
        completion = await client(url, KEY).completions.create(**body)
        assert completion.usage is not None and completion.usage.completion_tokens >= 1

    # Admission refuses through the same Generations: 429, with when to come back.
    async with http_gateway(redis_url, demo_model_dir, max_active_streams=0) as (gateway, url):
        with pytest.raises(openai.RateLimitError) as limited:
            await client(url).completions.create(model=model_id(gateway), prompt="x")
        assert limited.value.response.headers["retry-after-ms"] == "1000"
        assert limited.value.body["type"] == "rate_limit_error"
        assert (
            gateway.generations.metrics.registry.get_sample_value(
                "codestream_gateway_http_requests_total", {"route": "/v1/completions", "code": "429"}
            )
            == 1
        )


# ------------------------------------------------------------------------------------------ disconnects


async def wait_idle(stack: Stack, bound_s: float = 10) -> None:
    engine = stack.worker.engine
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline and (engine.stats().num_running or stack.worker.requests):  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # polling engine state is the point: it has no event to wait on
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks
    assert not stack.worker.requests and not stack.gateway.generations.active


async def test_a_client_disconnect_frees_the_engine_slot(redis_url: str, demo_model_dir: Path):
    async with http_stack(redis_url, demo_model_dir) as (stack, url):
        engine = stack.worker.engine
        body = {"model": model_id(stack), "prompt": "def forever():", "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        session = aiohttp.ClientSession()
        try:
            response = await session.post(f"{url}/v1/completions", json=body | {"stream": True})
            received = 0
            async for line in response.content:
                received += line.startswith(b"data: {")
                if received == 3:
                    break
            assert engine.stats().num_running == 1
            response.close()  # drops the connection mid-stream
        finally:
            await session.close()
        await wait_idle(stack)

        # A non-streaming request abandoned while it runs goes the same way.
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(session.post(f"{url}/v1/completions", json=body))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not engine.stats().num_running:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert engine.stats().num_running == 1
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        await wait_idle(stack)
        await asyncio.sleep(0.1)  # the handlers' middleware counts them on its way out
        counted = stack.gateway.generations.metrics.registry.get_sample_value(
            "codestream_gateway_http_requests_total", {"route": "/v1/completions", "code": "499"}
        )
        assert counted == 2


# ------------------------------------------------------------------------------------ n and logprobs


async def test_n_samples_and_logprobs_have_openai_shapes(redis_url: str, demo_model_dir: Path):
    async with http_stack(redis_url, demo_model_dir) as (stack, url):
        oai, model = client(url), model_id(stack)
        params = {"model": model, "prompt": "def parse(text):", "max_tokens": 6, "temperature": 1.0, "seed": 5,
                  "n": 2, "extra_body": {"ignore_eos": True}}  # fmt: skip
        whole = await oai.completions.create(**params, logprobs=2)
        assert [c.index for c in whole.choices] == [0, 1] and whole.usage.completion_tokens == 12
        for choice in whole.choices:
            lp = choice.logprobs
            assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
            assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
            assert all(x <= 0 for x in lp.token_logprobs)
            # The two most likely alternatives, and the chosen token whether or not it is among them.
            assert all(2 <= len(top) <= 3 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
        # Each sample has its own seed: the two differ, and the same request gives the same two again,
        # streamed or not.
        assert whole.choices[0].text != whole.choices[1].text
        stream = await oai.completions.create(**params, stream=True)
        texts, finishes = ["", ""], [None, None]
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        assert texts == [c.text for c in whole.choices] and finishes == ["length", "length"]

        # A list of prompts: one generation each, concurrently; choice i * n + k is prompt i's sample k.
        stream = await oai.completions.create(**params | {"prompt": ["def a():", "class B:"]}, stream=True)
        per_choice: dict[int, str] = {}
        async for chunk in stream:
            for choice in chunk.choices:
                per_choice[choice.index] = per_choice.get(choice.index, "") + choice.text
        assert sorted(per_choice) == [0, 1, 2, 3]
        single = await oai.completions.create(**params | {"prompt": "class B:"})
        assert [per_choice[2], per_choice[3]] == [c.text for c in single.choices]

        # echo with logprobs: the prompt's tokens come first, the very first without a log-probability.
        echoed = await oai.completions.create(model=model, prompt="def parse(text):", max_tokens=3, temperature=0,
                                              echo=True, logprobs=0)  # fmt: skip
        choice = echoed.choices[0]
        assert choice.text.startswith("def parse(text):") and choice.logprobs is not None
        assert choice.logprobs.token_logprobs[0] is None and all(
            x is not None for x in choice.logprobs.token_logprobs[1:]
        )
        assert len(choice.logprobs.tokens) == echoed.usage.prompt_tokens + echoed.usage.completion_tokens


# ----------------------------------------------------------------------------------- turning it on, off


def test_http_port_is_a_flag_and_an_environment_variable():
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, GatewayConfig)
    assert GatewayConfig().http_port == 0  # off unless asked for
    assert settings.load(GatewayConfig, parser.parse_args(["--http-port", "8080"]), env={}).http_port == 8080
    env = {"CODESTREAM_HTTP_PORT": "8081"}
    assert settings.load(GatewayConfig, parser.parse_args([]), env=env).http_port == 8081


async def test_codestream_gateway_serves_http_when_asked(redis_url: str, demo_model_dir: Path):
    http_port = free_port()
    command = [
        sys.executable, "-m", "codestream.cli", "gateway", "--model", str(demo_model_dir), "--redis-url", redis_url,
        "--namespace", "thttpcli", "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "0",
        "--http-port", str(http_port),
    ]  # fmt: skip
    gateway = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, "CODESTREAM_LOG_FORMAT": "json"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                assert gateway.returncode is None, "the gateway exited"
                assert time.monotonic() < deadline, "no HTTP API on --http-port"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{http_port}/health") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            async with session.get(f"http://127.0.0.1:{http_port}/v1/models") as response:
                assert [m["id"] for m in (await response.json())["data"]] == [str(demo_model_dir)]
    finally:
        if gateway.returncode is None:
            gateway.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.wait(), timeout=30) == 0


async def test_a_drain_finishes_http_streams_in_flight_and_refuses_new_requests(redis_url: str, demo_model_dir: Path):
    async with http_stack(redis_url, demo_model_dir) as (stack, url), aiohttp.ClientSession() as session:
        body = {"model": model_id(stack), "prompt": "def f():", "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        async with session.post(f"{url}/v1/completions", json=body) as response:
            first = await response.content.readline()
            assert first.startswith(b"data: {")
            stopping = asyncio.create_task(stack.gateway.stop(grace_s=20))
            await asyncio.sleep(0.05)
            with pytest.raises(aiohttp.ClientConnectionError):  # the listening socket is closed
                async with aiohttp.ClientSession() as other:
                    await other.get(f"{url}/v1/models")
            rest = (await response.read()).decode()
        await stopping
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
