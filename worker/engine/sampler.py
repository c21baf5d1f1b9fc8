"""Picks the next token of every sequence in the batch, each with its own parameters, in one pass.

The controls act in Hugging Face's order and with its meaning: `GenerationMixin._get_logits_processor`
(transformers 5) appends the logits processors first, then, only when sampling, the former warpers:

  processors, every row (greedy rows too), on the model's raw logits:
    1. logit bias            SequenceBiasLogitsProcessor (HF's first processor), single tokens
    2. repetition penalty    RepetitionPenaltyLogitsProcessor, over the prompt and the generated tokens
    3. presence, frequency   no HF processor: OpenAI's/vLLM's definition, over the generated tokens only,
                             applied with the other penalty (vLLM applies them right after repetition)
    4. min_new_tokens        MinNewTokensLengthLogitsProcessor: while fewer than min_new_tokens tokens were
                             generated, EOS (unless ignore_eos) and the stop token ids get -inf
  warpers, sampled rows only (temperature > 0):
    5. temperature  6. top-k  7. top-p  8. min-p  9. typical-p

Greedy rows take the exact argmax of the processed logits. Everything is batched (logits_processors.py):
per-row parameters go to the device as one small tensor per kind, built once per step; the token history
(needed by the penalties only) is sent only for rows that use a penalty, as a flat list turned into counts
by one scatter. No per-request launches, no host sync before the step's single read of the chosen tokens.

Sampling uses the exponential-race form of the Gumbel-max trick (argmax of p / E with E ~ Exp(1)). The noise
is a counter-based hash of (request seed, index of the generated token, vocabulary id), computed for the
whole batch at once on the device: no generator objects, and a request's draws depend neither on what else is
in the batch nor on whether it was preempted and recomputed. Being integer arithmetic, it is the same on CPU
and GPU.

Log-probabilities are always those of the model's raw distribution: log_softmax of the logits before any
processor or warper (penalties, bias, temperature and truncation do not change them), as vLLM reports them.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine import logits_processors as lp
from worker.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
# Odd multipliers below 2**31: products of 32-bit values stay inside int64 (no signed overflow).
_COLUMN_MIX = 0x27D4EB2D
_HASH_MUL = 0x045D9F3B


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request (sampling.n > 1): sample 0 keeps the request's own."""
    return seed if index == 0 else mix_seed(seed, -1 - index) & _MASK64


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
    logprob: float  # under the model's raw distribution (log_softmax of the logits before any processor)
    rank: int  # 1 = most likely; 1 + the number of tokens strictly more likely
    top: list[tuple[int, float]]  # the n most likely (token id, logprob), most likely first


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, device: torch.device, eos_token_id: int | None = None) -> None:
        self.device = device
        self.eos_token_id = eos_token_id

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        steps: list[int],
        histories: Sequence[Sequence[int]] | None = None,
    ) -> SampleResult:
        """logits: float32 [batch, vocab]; steps[i]: index of the token row i generates (0 = first), i.e. the
        number of tokens it generated so far; histories[i]: its prompt followed by those tokens (the last
        steps[i] entries), needed only by rows with a penalty."""
        token_ids = self.choose(logits, params, steps, histories).tolist()  # the step's one host sync
        return SampleResult(token_ids=token_ids, logprobs=self.logprobs(logits, token_ids, params))

    def choose(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        steps: list[int],
        histories: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """The token of every row, as a tensor on the logits' device: no host sync (see __call__)."""
        processed = self._process(logits, params, steps, histories)
        next_tokens = processed.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = self._tensor(sampled_rows, torch.long)
            probs = self._warp(processed[rows], [params[i] for i in sampled_rows]).softmax(dim=-1)
            keys = [mix_seed(params[i].seed, steps[i]) & _MASK32 for i in sampled_rows]
            noise = exponential_noise(self._tensor(keys, torch.int64), probs.shape[-1])
            next_tokens[rows] = (probs / noise).argmax(dim=-1)
        return next_tokens

    def process(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        steps: list[int],
        histories: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """The logits each row's token is drawn from: processors on every row, then the warpers on sampled
        rows (greedy rows: their argmax). Removed tokens are -inf. For tests and inspection."""
        out = self._process(logits, params, steps, histories)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = self._tensor(sampled_rows, torch.long)
            out = out.index_put((rows,), self._warp(out[rows], [params[i] for i in sampled_rows]))
        return out

    def token_logprobs(self, logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
        """Row r: the log-probability of token_ids[r] under log_softmax(logits[r]), its rank, and the
        num_top[r] most likely tokens. For generated tokens and prompt tokens alike."""
        if not token_ids:
            return []
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(1, self._tensor(token_ids, torch.long)[:, None])
        ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
        chosen_list = chosen[:, 0].tolist()
        k = min(max(num_top), logp.shape[-1])
        top_ids: list[list[int]] = [[] for _ in token_ids]
        top_vals: list[list[float]] = top_ids
        if k > 0:
            top = logp.topk(k, dim=-1)
            top_ids, top_vals = top.indices.tolist(), top.values.tolist()
        return [
            TokenLogprobs(t, chosen_list[r], ranks[r], list(zip(top_ids[r][:n], top_vals[r][:n], strict=True)))
            for r, (t, n) in enumerate(zip(token_ids, num_top, strict=True))
        ]

    # -- internals ---------------------------------------------------------------------------------------

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)

    def _process(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        steps: list[int],
        histories: Sequence[Sequence[int]] | None,
    ) -> torch.Tensor:
        """Steps 1-4 of the module docstring, on every row; rows without a control are left untouched."""
        vocab = logits.shape[-1]
        out = logits
        bias = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias if t < vocab]
        if bias:
            rows, ids, values = zip(*bias, strict=True)
            index = self._tensor([*rows, *ids], torch.long).view(2, -1)
            out = lp.add_logit_bias(out, index[0], index[1], self._tensor(list(values), logits.dtype))
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        if penalized:
            if histories is None:
                raise ValueError("repetition/presence/frequency penalties need the token histories")
            out = self._penalize(out, penalized, params, steps, histories)
        masked_rows: list[int] = []
        masked_ids: list[int] = []
        for r, p in enumerate(params):
            if steps[r] < p.min_new_tokens:
                eos = () if p.ignore_eos or self.eos_token_id is None else (self.eos_token_id,)
                ids = [t for t in (*p.stop_token_ids, *eos) if t < vocab]
                masked_rows.extend(r for _ in ids)
                masked_ids.extend(ids)
        if masked_ids:
            index = self._tensor([*masked_rows, *masked_ids], torch.long).view(2, -1)
            out = lp.suppress(out, index[0], index[1])
        return out

    def _penalize(
        self,
        logits: torch.Tensor,
        rows: list[int],
        params: list[SamplingParams],
        steps: list[int],
        histories: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Repetition penalty over prompt + output, presence/frequency over the output, for `rows` only."""
        # Histories can be long: gathered with array.array (C loops), not Python lists turned into tensors.
        gen_ids, seen_ids = array("q"), array("q")
        gen_lens: list[int] = []
        seen_lens: list[int] = []
        for i in rows:
            history, generated = histories[i], min(steps[i], len(histories[i]))
            split = len(history) - generated
            gen_ids.extend(history[split:])
            gen_lens.append(generated)
            prompt = history[:split] if params[i].repetition_penalty != 1.0 else ()
            seen_ids.extend(prompt)  # the output's tokens are marked seen from the counts
            seen_lens.append(len(prompt))
        n = len(rows)
        host = torch.frombuffer(array("q", [*rows, *gen_lens, *seen_lens]) + gen_ids + seen_ids, dtype=torch.int64)
        ints = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        row_index, gen_lens_t, seen_lens_t, gen_t, seen_t = ints.split([n, n, n, len(gen_ids), len(seen_ids)])
        floats = self._tensor(
            [[params[i].repetition_penalty, params[i].presence_penalty, params[i].frequency_penalty] for i in rows],
            logits.dtype,
        )
        local = torch.arange(n, device=logits.device)
        counts = torch.zeros(n, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        gen_rows = local.repeat_interleave(gen_lens_t, output_size=len(gen_ids))
        counts.index_put_((gen_rows, gen_t), torch.ones_like(gen_t, dtype=logits.dtype), accumulate=True)
        seen = counts > 0
        if seen_ids:
            seen_rows = local.repeat_interleave(seen_lens_t, output_size=len(seen_ids))
            seen.index_put_((seen_rows, seen_t), torch.tensor(True, device=logits.device))
        sub = lp.repetition_penalty(logits[row_index], seen, floats[:, 0])
        sub = lp.presence_frequency_penalty(sub, counts, floats[:, 1], floats[:, 2])
        return logits.index_put((row_index,), sub)

    def _warp(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Steps 5-9 of the module docstring, on sampled rows (each control only where some row uses it)."""
        vocab = logits.shape[-1]
        top_k = [p.top_k if p.top_k < vocab else 0 for p in params]  # k >= vocab keeps all: off
        # 1 - top_p in double, as Hugging Face computes it; -1 (nothing removed) where top_p is off.
        values = [
            [p.temperature, 1.0 - p.top_p if p.top_p < 1.0 else -1.0, p.min_p, p.typical_p, k]
            for p, k in zip(params, top_k, strict=True)
        ]
        f = self._tensor(values, torch.float32)
        out = lp.temperature(logits, f[:, 0].to(logits.dtype))
        if max(top_k) > 0:
            out = lp.top_k(out, f[:, 4].long(), max(top_k))
        if min(p.top_p for p in params) < 1.0:
            out = lp.top_p(out, f[:, 1])
        if max(p.min_p for p in params) > 0.0:
            out = lp.min_p(out, f[:, 2])
        if min(p.typical_p for p in params) < 1.0:
            out = lp.typical_p(out, f[:, 3], f[:, 3] < 1.0)
        return out

    def logprobs(
        self, logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        """Log-probabilities under the model's own distribution (raw logits, before any processor)."""
        wanted = [i for i, p in enumerate(params) if p.logprobs >= 0]
        result: list[TokenLogprobs | None] = [None] * len(params)
        if not wanted:
            return result
        rows = logits if len(wanted) == len(params) else logits[self._tensor(wanted, torch.long)]
        computed = self.token_logprobs(rows, [token_ids[i] for i in wanted], [params[i].logprobs for i in wanted])
        for i, lps in zip(wanted, computed, strict=True):
            result[i] = lps
        return result
