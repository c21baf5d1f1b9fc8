"""Picks the next token of every sequence in the batch, each with its own parameters, in one pass.

The warpers follow Hugging Face's order and meaning: temperature, then top-k, then top-p. Sampling uses
the exponential-race form of the Gumbel-max trick (argmax of p / E with E ~ Exp(1)). The noise is a
counter-based hash of (request seed, index of the generated token, vocabulary id), computed for the whole
batch at once on the device: no generator objects, no per-request launches or host syncs, and a request's
draws depend neither on what else is in the batch nor on whether it was preempted and recomputed. Being
integer arithmetic, it is the same on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
# Odd multipliers below 2**31: products of 32-bit values stay inside int64 (no signed overflow).
_COLUMN_MIX = 0x27D4EB2D
_HASH_MUL = 0x045D9F3B


def mix_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a well-spread key for each (request, generated token index)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab], a pure function of each row's 32-bit key and the column index."""
    columns = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    x = keys[:, None] ^ ((columns * _COLUMN_MIX) & _MASK32)
    for _ in range(2):  # Thomas Mueller's 32-bit integer hash, twice
        x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
        x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
        x = (x >> 16) ^ x
    uniform = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0
    return -torch.log(uniform)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> SampleResult:
        """logits: float32 [batch, vocab]; steps[i]: index of the token row i generates (0 = first)."""
        next_tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=self.device)
            row_params = [params[i] for i in sampled_rows]
            probs = self._warped_probs(logits[rows], row_params)
            keys = [mix_seed(params[i].seed, steps[i]) & _MASK32 for i in sampled_rows]
            noise = exponential_noise(
                torch.tensor(keys, dtype=torch.int64).to(self.device, non_blocking=True), probs.shape[-1]
            )
            next_tokens[rows] = (probs / noise).argmax(dim=-1)
        token_ids = next_tokens.tolist()
        return SampleResult(token_ids=token_ids, logprobs=self._logprobs(logits, next_tokens, params))

    def _warped_probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        vocab = logits.shape[-1]
        temperature = torch.tensor([p.temperature for p in params], device=self.device)
        logits = logits / temperature[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        if min(top_k) < vocab:
            k = torch.tensor(top_k, device=self.device)
            kth = logits.topk(max(top_k), dim=-1).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = [p.top_p for p in params]
        if min(top_p) < 1.0:
            p = torch.tensor(top_p, device=self.device)
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # Drop a token once the more likely ones already reach top_p (the first is always kept).
            sorted_logits = sorted_logits.masked_fill(mass_before >= p[:, None], float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return logits.softmax(dim=-1)

    def _logprobs(
        self, logits: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        """Log-probabilities under the model's own distribution (raw logits, before any warper)."""
        wanted = [i for i, p in enumerate(params) if p.logprobs >= 0]
        result: list[TokenLogprobs | None] = [None] * len(params)
        if not wanted:
            return result
        rows = torch.tensor(wanted, device=self.device)
        logp = logits[rows].log_softmax(dim=-1)
        chosen_logp = logp.gather(1, chosen[rows][:, None])
        ranks = (logp > chosen_logp).sum(dim=-1) + 1
        max_top = max(params[i].logprobs for i in wanted)
        top = logp.topk(max_top, dim=-1) if max_top > 0 else None
        chosen_list, ranks_list = chosen_logp[:, 0].tolist(), ranks.tolist()
        top_ids = top.indices.tolist() if top is not None else None
        top_vals = top.values.tolist() if top is not None else None
        for j, i in enumerate(wanted):
            n = params[i].logprobs
            alternatives = list(zip(top_ids[j][:n], top_vals[j][:n], strict=True)) if top_ids and n else []
            result[i] = TokenLogprobs(int(chosen[i]), chosen_list[j], ranks_list[j], alternatives)
        return result
