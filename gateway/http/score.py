"""POST /score: the Code Llama model card's request, the Azure ML real-time endpoint's format.

    {"input_data": {"input_string": ["def fib(n):", ...], "parameters": {"return_full_text": false, ...}}}
    -> [{"0": "..."}, ...]                                       one entry per input string, in order

Parameters keep their Hugging Face meaning and map onto GenerateRequest field for field; each input string
is one generation, all running concurrently. As in transformers' text-generation pipeline, the text is the
prompt followed by the completion unless `return_full_text` is false.
"""

from __future__ import annotations

from typing import Any

from gateway.config import GatewayConfig
from gateway.http.params import Kind, Params, apply, resolver
from gateway.http.runs import Choice, Plan, Run, Update
from gateway.model_card import ModelCard
from gateway.validation import InvalidRequest, resolve
from protos import api

PARAMETERS: dict[str, tuple[str, Kind]] = {
    # transformers' generate() names ...
    "do_sample": ("sampling.do_sample", "bool"),
    "temperature": ("sampling.temperature", "number"),
    "top_k": ("sampling.top_k", "uint32"),
    "top_p": ("sampling.top_p", "number"),
    "min_p": ("sampling.min_p", "number"),
    "typical_p": ("sampling.typical_p", "number"),
    "repetition_penalty": ("sampling.repetition_penalty", "number"),
    "max_new_tokens": ("stopping.max_new_tokens", "uint32"),
    "min_new_tokens": ("stopping.min_new_tokens", "uint32"),
    # ... and GenerateRequest's own, for what generate() spells otherwise or lacks (`stop` is generate()'s
    # `stop_strings`, accepted too; errors name it `stop`).
    "stop": ("stopping.stop", "strings"),
    "stop_strings": ("stopping.stop", "strings"),
    "stop_token_ids": ("stopping.stop_token_ids", "uint32s"),
    "ignore_eos": ("stopping.ignore_eos", "bool"),
    "include_stop_sequence": ("stopping.include_stop_sequence", "bool"),
    "seed": ("sampling.seed", "uint64"),
    "presence_penalty": ("sampling.presence_penalty", "number"),
    "frequency_penalty": ("sampling.frequency_penalty", "number"),
    "logit_bias": ("sampling.logit_bias", "bias"),
    "truncate_prompt": ("truncate_prompt", "bool"),
}
HINTS = {
    "num_return_sequences": "not supported: /score answers one text per input string (/v1/completions has n)",
    "max_length": "not supported: use max_new_tokens (generated tokens, the prompt not counted)",
}
PREFIX = "input_data.parameters"
# Error paths: the first name listed for a field.
NAMES = {path: f"{PREFIX}.{name}" for name, (path, _) in reversed(PARAMETERS.items())} | {
    "response.return_full_text": f"{PREFIX}.return_full_text"
}


def parse(body: Any, card: ModelCard, config: GatewayConfig) -> Plan:
    top = Params(body)
    top.ignore("input_data")
    top.refuse_unknown()  # first: a misplaced `input_string` is named as such, not as a missing input_data
    if not top.has("input_data"):
        raise InvalidRequest("input_data", 'required: {"input_string": [...], "parameters": {...}}')
    data = Params(top.values["input_data"], "input_data")
    strings = data.get("input_string", "list")
    if not strings:
        raise InvalidRequest("input_data.input_string", "required: a list of one or more strings")
    parameters = Params(data.get("parameters", "object", {}), PREFIX)
    data.refuse_unknown()
    template = api.GenerateRequest()
    apply(template, parameters, PARAMETERS)
    # The pipeline's default is True: the answer starts with the prompt.
    template.response.return_full_text = parameters.get("return_full_text", "bool", True)
    parameters.refuse_unknown(HINTS)
    resolvers = []
    for i, text in enumerate(strings):
        if not isinstance(text, str):
            raise InvalidRequest(f"input_data.input_string[{i}]", "must be a string")
        request = api.GenerateRequest(prompt=text)
        request.MergeFrom(template)
        names = NAMES | {"prompt": f"input_data.input_string[{i}]"}
        resolvers.append(resolver(resolve, request, card, config, names))
    return Plan(resolvers, n=1, output=ScoreOutput())


class ScoreOutput:
    def response(self, run: Run, choices: list[Choice]) -> list[dict[str, str]]:
        # "0": the column of the pandas DataFrame the Azure ML scoring script answers with, one row per input.
        return [{"0": choice.text} for choice in choices]

    # /score does not stream.
    def start(self, run: Run) -> list[dict[str, Any]]:
        return []

    def update(self, run: Run, update: Update) -> list[dict[str, Any]]:
        return []

    def end(self, run: Run) -> list[dict[str, Any]]:
        return []
