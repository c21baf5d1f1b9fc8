"""Turns a GenerateRequest into a fully resolved job: every field checked, every default applied.

Each problem raises InvalidRequest naming the field as it is spelled in the request
(`sampling.top_p: must be in (0, 1], got 1.5`), which the servicer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.model_card import ModelCard
from protos import api, bus

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class InvalidRequest(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class ResolvedRequest:
    request_id: str  # empty: the gateway assigns one
    prompt_token_ids: list[int]
    prompt_text: str
    params: bus.ResolvedParams
    return_full_text: bool
    return_token_ids: bool


def resolve(request: api.GenerateRequest, card: ModelCard, config: GatewayConfig) -> ResolvedRequest:
    if request.request_id and not REQUEST_ID.match(request.request_id):
        raise InvalidRequest("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    prompt_ids, prompt_text = _prompt(request, card, config)
    params = bus.ResolvedParams()
    _sampling(request.sampling, card, params)
    _stopping(request.stopping, len(prompt_ids), card, config, params)
    params.logprobs = -1
    if request.response.HasField("logprobs"):
        if request.response.logprobs > config.max_logprobs:
            raise InvalidRequest("response.logprobs", f"at most {config.max_logprobs}")
        params.logprobs = request.response.logprobs
    return ResolvedRequest(
        request_id=request.request_id,
        prompt_token_ids=prompt_ids,
        prompt_text=prompt_text,
        params=params,
        return_full_text=request.response.return_full_text,
        return_token_ids=request.response.return_token_ids,
    )


def _prompt(request: api.GenerateRequest, card: ModelCard, config: GatewayConfig) -> tuple[list[int], str]:
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("prompt", "required (set prompt or prompt_token_ids)")
    if which == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt", "must not be empty")
        if len(request.prompt) > config.max_prompt_chars:
            raise InvalidRequest("prompt", f"longer than {config.max_prompt_chars} characters")
        return card.encode(request.prompt), request.prompt
    ids = list(request.prompt_token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt_token_ids", "must not be empty")
    bad = next((t for t in ids if t >= card.vocab_size), None)
    if bad is not None:
        raise InvalidRequest("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {card.vocab_size})")
    return ids, card.tokenizer.decode(ids, skip_special_tokens=True)


def _sampling(s: api.SamplingParameters, card: ModelCard, out: bus.ResolvedParams) -> None:
    do_sample = s.do_sample if s.HasField("do_sample") else card.default_do_sample
    temperature = s.temperature if s.HasField("temperature") else card.default_temperature
    top_p = s.top_p if s.HasField("top_p") else card.default_top_p
    top_k = s.top_k if s.HasField("top_k") else card.default_top_k
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    out.temperature = temperature if do_sample else 0.0
    out.top_k = top_k
    out.top_p = top_p
    # Every request gets a seed, drawn here if the client gave none, so that it can be reported and replayed.
    out.seed = s.seed if s.HasField("seed") else secrets.randbits(63)


def _stopping(
    s: api.StoppingCriteria, prompt_len: int, card: ModelCard, config: GatewayConfig, out: bus.ResolvedParams
) -> None:
    limit = min(config.max_new_tokens_limit, card.max_model_len)
    if prompt_len >= card.max_model_len:
        raise InvalidRequest("prompt", f"{prompt_len} tokens; the model's context is {card.max_model_len} tokens")
    if s.HasField("max_new_tokens"):
        if not 1 <= s.max_new_tokens <= limit:
            raise InvalidRequest("stopping.max_new_tokens", f"must be in [1, {limit}], got {s.max_new_tokens}")
        max_new = s.max_new_tokens
        if prompt_len + max_new > card.max_model_len:
            raise InvalidRequest(
                "stopping.max_new_tokens",
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context of "
                f"{card.max_model_len} tokens",
            )
    else:
        # Unset: the default, shortened to what the context leaves.
        max_new = min(config.max_new_tokens_default, limit, card.max_model_len - prompt_len)
    if len(s.stop) > config.max_stop_sequences:
        raise InvalidRequest("stopping.stop", f"at most {config.max_stop_sequences} stop sequences")
    for i, stop in enumerate(s.stop):
        if not stop:
            raise InvalidRequest(f"stopping.stop[{i}]", "must not be empty")
        if len(stop) > config.max_stop_sequence_chars:
            raise InvalidRequest(f"stopping.stop[{i}]", f"longer than {config.max_stop_sequence_chars} characters")
    out.max_new_tokens = max_new
    out.stop.extend(s.stop)
    out.ignore_eos = s.ignore_eos
