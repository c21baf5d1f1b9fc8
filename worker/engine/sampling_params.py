"""Per-request generation parameters, fully resolved (the gateway has applied every default).

The names follow the wire contract (`ResolvedParams` in protos/codestream/v1/bus.proto); the meaning of each
control is Hugging Face's (see sampler.py for the order they are applied in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy (argmax of the processed logits); otherwise logits are divided by it before sampling.
    temperature: float = 0.0
    # Keep the k most likely tokens; 0 keeps all.
    top_k: int = 0
    # Keep the smallest set of most likely tokens whose probability reaches top_p; 1.0 keeps all.
    top_p: float = 1.0
    # Keep tokens whose probability is at least min_p times the most likely one's; 0 keeps all.
    min_p: float = 0.0
    # Locally typical sampling (Meister et al.), in (0, 1]; 1 keeps all.
    typical_p: float = 1.0
    # Hugging Face's repetition penalty over the prompt and the generated tokens (> 0; 1 is off): a seen
    # token's logit is divided by it if positive, multiplied if negative. Applies to greedy decoding too.
    repetition_penalty: float = 1.0
    # OpenAI-style penalties over the generated tokens, in [-2, 2]: subtracted once from the logit of every
    # token already generated (presence) and once per occurrence (frequency). Greedy decoding too.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs, bias in [-100, 100], added to the raw logits (greedy decoding too). A mapping
    # is accepted and stored as a tuple sorted by token id (hashable).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Sampling noise is a function of (seed, index of the generated token) only, so a request draws the
    # same tokens whatever else is in the batch, and after a preemption or a restart.
    seed: int = 0
    max_new_tokens: int = 256
    # Neither the end-of-sequence token nor a stop token id can be generated (they are masked) or end the
    # generation before this many tokens.
    min_new_tokens: int = 0
    # Stop when the generated text contains one of these; the text ends just before it (or just after it
    # with include_stop_sequence).
    stop: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    # Stop when one of these is generated; the token is not part of the text (finish reason: EOS).
    stop_token_ids: tuple[int, ...] = ()
    # The end-of-sequence token neither ends the generation nor is masked by min_new_tokens.
    ignore_eos: bool = False
    # -1: no logprobs; n >= 0: the chosen token's logprob, its rank and the n most likely alternatives.
    logprobs: int = -1
    # Also the log-probability of every prompt token after the first (in the request's first output), with
    # max(logprobs, 0) alternatives.
    prompt_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Needs the token history (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def __post_init__(self) -> None:
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if not 0.0 < self.typical_p <= 1.0:
            raise ValueError("typical_p must be in (0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError("repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2]")
        ids = [t for t, _ in self.logit_bias]
        if any(t < 0 for t in ids) or len(set(ids)) != len(ids):
            raise ValueError("logit_bias token ids must be distinct and >= 0")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if self.logprobs < -1:
            raise ValueError("logprobs must be >= -1")
