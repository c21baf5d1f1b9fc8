"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models, onto the gRPC API's messages.

OpenAI's names and defaults, converted to GenerateRequest (InfillRequest with `suffix`, ChatRequest for
chat), then resolved by gateway.validation like any gRPC request:

- `max_tokens` -> stopping.max_new_tokens (default 16 for completions, as OpenAI; chat: the gateway's);
- `temperature` (default 1; 0 is greedy) -> sampling.temperature, and do_sample = temperature > 0; OpenAI
  has no top-k, so top_k is 0 (off) unless the request sets one;
- `top_p`, `n`, `seed`, `presence_penalty`, `frequency_penalty`, `logit_bias` -> sampling; `stop` ->
  stopping.stop; `logprobs` -> response.logprobs (with `echo`, also the prompt's);
- `prompt`: a string, a list of strings (one generation each, concurrently), token ids, or lists of them;
  `suffix` -> Code Llama infilling; `echo` puts each choice's prompt in front of its text;
- beyond OpenAI, under vLLM's names: `top_k`, `min_p`, `typical_p`, `repetition_penalty`, `min_tokens`,
  `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.config import GatewayConfig
from gateway.http.errors import HttpError
from gateway.http.params import Kind, Params, apply, resolver
from gateway.http.pieces import Pieces
from gateway.http.runs import Choice, Plan, Run, Update
from gateway.model_card import ModelCard
from gateway.prompts import NO_CHAT_TEMPLATE, NO_INFILLING, UnsupportedByModel
from gateway.validation import InvalidRequest, resolve, resolve_chat, resolve_infill
from protos import api

SAMPLING: dict[str, tuple[str, Kind]] = {
    "top_p": ("sampling.top_p", "number"),
    "n": ("sampling.n", "uint32"),
    "seed": ("sampling.seed", "uint64"),
    "presence_penalty": ("sampling.presence_penalty", "number"),
    "frequency_penalty": ("sampling.frequency_penalty", "number"),
    "logit_bias": ("sampling.logit_bias", "bias"),
    "stop": ("stopping.stop", "strings"),
    "top_k": ("sampling.top_k", "uint32"),
    "min_p": ("sampling.min_p", "number"),
    "typical_p": ("sampling.typical_p", "number"),
    "repetition_penalty": ("sampling.repetition_penalty", "number"),
    "min_tokens": ("stopping.min_new_tokens", "uint32"),
    "ignore_eos": ("stopping.ignore_eos", "bool"),
    "stop_token_ids": ("stopping.stop_token_ids", "uint32s"),
    "include_stop_str_in_output": ("stopping.include_stop_sequence", "bool"),
}
NAMES = {path: name for name, (path, _) in SAMPLING.items()} | {
    "sampling.temperature": "temperature",
    "sampling.do_sample": "temperature",
    "stopping.max_new_tokens": "max_tokens",
    "response.logprobs": "logprobs",
}
# Accepted and without effect here.
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
NOT_SUPPORTED = "not supported: codestream generates text only"
CHAT_HINTS = dict.fromkeys(("tools", "tool_choice", "functions", "function_call", "response_format"), NOT_SUPPORTED)
# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}
FINISH_REASON = {api.STOP_REASON_LENGTH: "length"}  # else "stop": EOS, a stop sequence or stop token (OpenAI's)


def model(card: ModelCard, created: int) -> dict[str, Any]:
    return {
        "id": card.model_id, "object": "model", "created": created, "owned_by": "codestream",
        "max_model_len": card.max_model_len,
    }  # fmt: skip


def models(card: ModelCard, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model(card, created)]}


def check_model(name: str, card: ModelCard) -> None:
    if name != card.model_id:
        raise HttpError(
            404, f"the model {name!r} does not exist: this gateway serves {card.model_id!r}", "model", "model_not_found"
        )


def _common(body: Params, card: ModelCard, template: api.GenerateRequest | api.ChatRequest) -> tuple[int, bool, bool]:
    """What completions and chat share: the model, sampling, streaming. Returns (n, stream, include_usage)."""
    name = body.get("model", "string")
    if name is None:
        raise InvalidRequest("model", "required (GET /v1/models lists the one served)")
    check_model(name, card)
    temperature = body.get("temperature", "number", 1.0)
    template.sampling.temperature = temperature
    template.sampling.do_sample = temperature > 0
    # The model's default top_k (50, as transformers') would narrow the distribution OpenAI's parameters describe.
    template.sampling.top_k = 0
    apply(template, body, SAMPLING)
    body.ignore(*IGNORED)
    stream = body.get("stream", "bool", False)
    options = Params(body.get("stream_options", "object", {}), "stream_options")
    include_usage = options.get("include_usage", "bool", False)
    options.refuse_unknown()
    return (template.sampling.n if template.sampling.HasField("n") else 1), stream, include_usage


def unsupported(param: str, card: ModelCard) -> Callable[[UnsupportedByModel], HttpError]:
    """The 400 for a model that cannot do what the request asks, naming the field that asked for it."""

    def error(exc: UnsupportedByModel) -> HttpError:
        message = {
            NO_CHAT_TEMPLATE: f"the model {card.model_id!r} has no chat template (it is not an Instruct checkpoint): "
            "use /v1/completions",
            NO_INFILLING: f"the model {card.model_id!r} has no infilling tokens: leave out suffix",
        }.get(exc.problem, str(exc))
        return HttpError(400, message, param, "model_not_supported")

    return error


# ------------------------------------------------------------------------------------------- completions


def _prompts(value: Any) -> tuple[list[str | list[int]], bool]:
    """OpenAI's prompt forms -> the prompts, and whether the client sent a list of them."""
    if isinstance(value, str):
        return [value], False
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value), True
        if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            return [list(value)], False
        if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)
               for p in value):  # fmt: skip
            return list(value), True
    raise InvalidRequest(
        "prompt", "required: a string, a list of strings, a list of token ids or a list of lists of token ids"
    )


def parse_completion(json_body: Any, card: ModelCard, config: GatewayConfig, pieces: Pieces) -> Plan:
    body = Params(json_body)
    template = api.GenerateRequest()
    n, stream, include_usage = _common(body, card, template)
    template.stopping.max_new_tokens = body.get("max_tokens", "uint32", 16)  # OpenAI's default
    echo = body.get("echo", "bool", False)
    logprobs = body.get("logprobs", "uint32")
    if logprobs is not None:
        template.response.logprobs = logprobs
        template.response.prompt_logprobs = echo  # the echoed prompt's tokens come with theirs
    best_of = body.get("best_of", "uint32")
    if best_of is not None and best_of != n:
        raise InvalidRequest("best_of", f"only best_of = n ({n}) is supported")
    suffix = body.get("suffix", "string")
    prompts, listed = _prompts(body.values.get("prompt"))
    body.ignore("prompt")
    body.refuse_unknown()
    if suffix is not None and echo:
        raise InvalidRequest("echo", "not supported with suffix: the text is the middle")
    resolvers = []
    for i, prompt in enumerate(prompts):
        name = f"prompt[{i}]" if listed else "prompt"
        names = NAMES | {"prompt": name, "prompt_token_ids": name, "prefix": name}
        if suffix is not None:
            if not isinstance(prompt, str):
                raise InvalidRequest("suffix", "needs a text prompt")
            infill = api.InfillRequest(
                prefix=prompt, suffix=suffix, sampling=template.sampling, stopping=template.stopping,
                response=template.response,
            )  # fmt: skip
            resolvers.append(resolver(resolve_infill, infill, card, config, names))
            continue
        request = (
            api.GenerateRequest(prompt=prompt)
            if isinstance(prompt, str)
            else api.GenerateRequest(prompt_token_ids=api.TokenIds(ids=prompt))
        )
        request.MergeFrom(template)
        resolvers.append(resolver(resolve, request, card, config, names))
    output = CompletionOutput(pieces, card.model_id, echo, logprobs is not None, include_usage)
    return Plan(resolvers, n, output, stream, unsupported("suffix", card))


class CompletionOutput:
    def __init__(self, pieces: Pieces, model_id: str, echo: bool, logprobs: bool, include_usage: bool) -> None:
        self.pieces = pieces
        self.model_id = model_id
        self.echo = echo
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self.started: set[int] = set()  # choices that have had their first chunk (streaming)
        self.offsets: dict[int, int] = {}  # text_offset reached, per choice (streaming)

    def _prompt(self, run: Run, generation: int) -> tuple[str, list[tuple[int, api.TokenLogprob | None]]]:
        """The echoed prompt: its text, and its tokens (the first has no log-probability, as in OpenAI's)."""
        if not self.echo:
            return "", []
        resolved = run.generations[generation].resolved
        if not self.logprobs:
            return resolved.prompt_text, []
        first = (resolved.prompt_token_ids[0], None)
        return resolved.prompt_text, [first, *((lp.token_id, lp) for lp in run.prompt_logprobs[generation])]

    def _body(self, run: Run, choices: list[dict[str, Any]], usage: bool = False) -> dict[str, Any]:
        body = {"id": f"cmpl-{run.id}", "object": "text_completion", "created": self.created, "model": self.model_id}
        return body | {"choices": choices} | ({"usage": run.usage()} if usage else {})

    def response(self, run: Run, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for i, choice in enumerate(choices):
            prompt, entries = self._prompt(run, i // run.n)
            logprobs = None
            if self.logprobs:
                entries += [(lp.token_id, lp) for lp in choice.logprobs]
                logprobs, _ = self.pieces.completion_logprobs(entries, 0, self.echo)
            out.append({"index": i, "text": prompt + choice.text, "logprobs": logprobs,
                        "finish_reason": finish_reason(choice.finished)})  # fmt: skip
        return self._body(run, out, usage=True)

    def start(self, run: Run) -> list[dict[str, Any]]:
        return []

    def update(self, run: Run, update: Update) -> list[dict[str, Any]]:
        i = update.choice
        text, entries, first = "", [], i not in self.started
        if first:
            self.started.add(i)
            text, entries = self._prompt(run, update.generation)
        if update.tokens is not None:
            text += update.tokens.text
            entries += [(lp.token_id, lp) for lp in update.tokens.logprobs]
        chunks = []
        if text or entries:
            logprobs = None
            if self.logprobs:
                logprobs, self.offsets[i] = self.pieces.completion_logprobs(
                    entries, self.offsets.get(i, 0), first and self.echo
                )
            chunks.append(self._chunk(run, i, text, logprobs, None))
        if update.finished is not None:
            chunks.append(self._chunk(run, i, "", None, finish_reason(update.finished)))
        return chunks

    def _chunk(self, run: Run, i: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return self._body(run, [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def end(self, run: Run) -> list[dict[str, Any]]:
        return [self._body(run, [], usage=True)] if self.include_usage else []


def finish_reason(finished: api.Finished | None) -> str:
    return FINISH_REASON.get(finished.stop_reason, "stop") if finished is not None else "stop"


# -------------------------------------------------------------------------------------------------- chat


def _content(value: Any, field: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            part_params = Params(part, f"{field}[{j}]")
            if part_params.get("type", "string") != "text":
                raise InvalidRequest(f"{field}[{j}].type", "only text parts are supported")
            parts.append(part_params.get("text", "string", ""))
            part_params.refuse_unknown()
        return "".join(parts)
    raise InvalidRequest(field, "required: a string or a list of text parts")


def parse_chat(json_body: Any, card: ModelCard, config: GatewayConfig, pieces: Pieces) -> Plan:
    body = Params(json_body)
    template = api.ChatRequest()
    n, stream, include_usage = _common(body, card, template)
    names = dict(NAMES)
    # max_completion_tokens replaced max_tokens in OpenAI's chat API; either is read. Unset: the gateway's default.
    for key in ("max_completion_tokens", "max_tokens"):
        if (max_tokens := body.get(key, "uint32")) is not None and not template.stopping.HasField("max_new_tokens"):
            template.stopping.max_new_tokens = max_tokens
            names["stopping.max_new_tokens"] = key
    logprobs = body.get("logprobs", "bool", False)
    top_logprobs = body.get("top_logprobs", "uint32")
    if logprobs:
        template.response.logprobs = top_logprobs or 0
        names["response.logprobs"] = "top_logprobs"
    elif top_logprobs is not None:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    messages = body.get("messages", "list")
    if not messages:
        raise InvalidRequest("messages", "required: a list of one or more messages")
    body.refuse_unknown(CHAT_HINTS)
    for i, message in enumerate(messages):
        fields = Params(message, f"messages[{i}]")
        role = fields.get("role", "string", "")
        content = _content(fields.values.get("content"), f"messages[{i}].content")
        fields.ignore("content", "name")
        fields.refuse_unknown()
        template.messages.add(role=ROLE_ALIASES.get(role, role), content=content)
    output = ChatOutput(pieces, card.model_id, logprobs, include_usage)
    return Plan([resolver(resolve_chat, template, card, config, names)], n, output, stream, unsupported("model", card))


class ChatOutput:
    def __init__(self, pieces: Pieces, model_id: str, logprobs: bool, include_usage: bool) -> None:
        self.pieces = pieces
        self.model_id = model_id
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())

    def _logprobs(self, logprobs: Any) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [self.pieces.chat_logprob(lp) for lp in logprobs], "refusal": None}

    def _body(self, run: Run, kind: str, choices: list[dict[str, Any]], usage: bool) -> dict[str, Any]:
        body = {"id": f"chatcmpl-{run.id}", "object": kind, "created": self.created, "model": self.model_id}
        return body | {"choices": choices} | ({"usage": run.usage()} if usage else {})

    def response(self, run: Run, choices: list[Choice]) -> dict[str, Any]:
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": finish_reason(choice.finished),
            }
            for i, choice in enumerate(choices)
        ]
        return self._body(run, "chat.completion", out, usage=True)

    def _chunk(self, run: Run, i: int, delta: dict[str, str], logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return self._body(run, "chat.completion.chunk", [choice], usage=False)

    def start(self, run: Run) -> list[dict[str, Any]]:
        # As OpenAI's: each choice's first delta carries the role.
        return [self._chunk(run, i, {"role": "assistant", "content": ""}, None, None) for i in range(run.choices)]

    def update(self, run: Run, update: Update) -> list[dict[str, Any]]:
        if update.tokens is None:
            return [self._chunk(run, update.choice, {}, None, finish_reason(update.finished))]
        if not update.tokens.text and not (self.logprobs and update.tokens.logprobs):
            return []
        logprobs = self._logprobs(update.tokens.logprobs)
        return [self._chunk(run, update.choice, {"content": update.tokens.text}, logprobs, None)]

    def end(self, run: Run) -> list[dict[str, Any]]:
        return [self._body(run, "chat.completion.chunk", [], usage=True)] if self.include_usage else []
