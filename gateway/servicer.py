"""The CodeStream gRPC service: convert the request, delegate to Generations, convert back."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc
from redis.exceptions import RedisError

from gateway import prompts
from gateway.auth import current_tenant
from gateway.config import GatewayConfig
from gateway.generations import Generation, Generations, RequestRejected
from gateway.model_card import ModelCard
from gateway.validation import InvalidRequest, resolve, resolve_chat, resolve_infill
from protos import api, api_grpc

STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
# A stream that finished for these reasons ends with this status (after its Finished event).
STATUS_BY_STOP_REASON = {api.STOP_REASON_DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED}


class CodeStreamServicer(api_grpc.CodeStreamServicer):
    def __init__(self, generations: Generations, card: ModelCard, config: GatewayConfig) -> None:
        self.generations = generations
        self.card = card
        self.config = config

    async def GenerateStream(
        self, request: api.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateEvent]:
        async for event in self._stream(request, self._resolve(request), context):
            yield event

    async def Infill(
        self, request: api.InfillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateEvent]:
        async for event in self._stream(request, lambda: resolve_infill(request, self.card, self.config), context):
            yield event

    async def Chat(
        self, request: api.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateEvent]:
        async for event in self._stream(request, lambda: resolve_chat(request, self.card, self.config), context):
            yield event

    async def _stream(
        self, request, resolve_request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateEvent]:
        generation = await self._open(request, context, resolve_request)
        try:
            async for event in generation.events():
                yield event
                await _end_with_status(event, context)
        finally:
            generation.close()

    def _resolve(self, request: api.GenerateRequest):
        return lambda: resolve(request, self.card, self.config)

    async def Generate(self, request: api.GenerateRequest, context: grpc.aio.ServicerContext) -> api.GenerateResponse:
        if request.sampling.n > 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.n: more than 1 sample needs GenerateStream")
        generation = await self._open(request, context, self._resolve(request))
        response = api.GenerateResponse(request_id=generation.request_id)
        text: list[str] = []
        try:
            async for event in generation.events():
                if event.HasField("tokens"):
                    text.append(event.tokens.text)
                    response.token_ids.extend(event.tokens.token_ids)
                    response.logprobs.extend(event.tokens.logprobs)
                elif event.HasField("finished"):
                    response.finished.CopyFrom(event.finished)
                await _end_with_status(event, context)
        finally:
            generation.close()
        response.generated_text = "".join(text)
        return response

    async def Tokenize(self, request: api.TokenizeRequest, context: grpc.aio.ServicerContext) -> api.TokenizeResponse:
        if len(request.text) > self.config.max_prompt_chars:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text: longer than {self.config.max_prompt_chars} characters",
            )
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        encoding = self.card.tokenizer.encode(request.text, add_special_tokens=add_special)
        return api.TokenizeResponse(token_ids=encoding.ids, tokens=encoding.tokens)

    async def GetModelInfo(self, request: api.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> api.ModelInfo:
        card, config = self.card, self.config
        return api.ModelInfo(
            model_id=card.model_id,
            max_model_len=card.max_model_len,
            vocab_size=card.vocab_size,
            bos_token_id=card.bos_token_id,
            eos_token_id=card.eos_token_id,
            max_new_tokens_default=config.max_new_tokens_default,
            max_new_tokens_limit=min(config.max_new_tokens_limit, card.max_model_len),
            max_prompt_chars=config.max_prompt_chars,
            max_stop_sequences=config.max_stop_sequences,
            max_stop_sequence_chars=config.max_stop_sequence_chars,
            max_logprobs=config.max_logprobs,
            default_sampling=api.SamplingParameters(
                do_sample=card.default_do_sample,
                temperature=card.default_temperature,
                top_k=card.default_top_k,
                top_p=card.default_top_p,
            ),
        )

    async def Cancel(self, request: api.CancelRequest, context: grpc.aio.ServicerContext) -> api.CancelResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
        try:
            await self.generations.cancel(self.generations.scoped(current_tenant(), request.request_id))
        except (RedisError, OSError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Redis unreachable ({exc}); retry")
        return api.CancelResponse()

    async def Resume(
        self, request: api.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api.GenerateEvent]:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
        remaining = context.time_remaining()
        timeout = min(remaining, self.config.request_timeout_s) if remaining else self.config.request_timeout_s
        try:
            resumed = self.generations.resume(request.request_id, request.after_seq, timeout, current_tenant())
            async for event in resumed:
                yield event
                await _end_with_status(event, context)
        except RequestRejected as exc:
            await context.abort(exc.code, str(exc))
        except (RedisError, OSError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Redis unreachable ({exc}); retry")

    async def _open(self, request, context: grpc.aio.ServicerContext, resolve_request) -> Generation:
        try:
            resolved = resolve_request()
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except prompts.UnsupportedByModel as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the request started")
        timeout = min(remaining, self.config.request_timeout_s) if remaining else self.config.request_timeout_s
        try:
            return await self.generations.open(resolved, timeout, current_tenant(), _traceparent(context))
        except (RedisError, OSError) as exc:
            # Redis unreachable, or a pooled connection that died with a Redis restart: UNAVAILABLE (which
            # clients retry), not UNKNOWN.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Redis unreachable ({exc}); retry")
        except RequestRejected as exc:
            if exc.retry_after_ms:
                context.set_trailing_metadata((("retry-after-ms", str(exc.retry_after_ms)),))
                await context.abort(exc.code, f"{exc}; retry after {exc.retry_after_ms / 1000:.1f} s")
            await context.abort(exc.code, str(exc))


TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _traceparent(context: grpc.aio.ServicerContext) -> str:
    """The client's W3C trace context, carried to the worker with the job (malformed ones are dropped)."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str) and TRACEPARENT.match(value):
            return value
    return ""


async def _end_with_status(event: api.GenerateEvent, context: grpc.aio.ServicerContext) -> None:
    """After a terminal event that is not a success, end the call with the matching status."""
    if event.HasField("error"):
        await context.abort(STATUS_BY_CODE.get(event.error.code, grpc.StatusCode.UNKNOWN), event.error.message)
    if event.HasField("finished") and event.finished.stop_reason in STATUS_BY_STOP_REASON:
        await context.abort(STATUS_BY_STOP_REASON[event.finished.stop_reason], "deadline exceeded")
