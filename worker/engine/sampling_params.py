"""Per-request generation parameters, fully resolved (the gateway has applied every default)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 0.0
    # Keep the k most likely tokens; 0 keeps all.
    top_k: int = 0
    # Keep the smallest set of most likely tokens whose probability reaches top_p; 1.0 keeps all.
    top_p: float = 1.0
    # Sampling noise is a function of (seed, index of the generated token) only, so a request draws the
    # same tokens whatever else is in the batch, and after a preemption or a restart.
    seed: int = 0
    max_new_tokens: int = 256
    # Stop when the generated text contains one of these; the text ends just before it.
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # -1: no logprobs; n >= 0: the chosen token's logprob, its rank and the n most likely alternatives.
    logprobs: int = -1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty")
