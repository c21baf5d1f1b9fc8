"""Batched logits processors and warpers: [rows, vocab] logits with one parameter per row.

Each function returns new logits (its input is left alone) and does, row by row, exactly what the Hugging
Face class named in its docstring does with that row's parameter (transformers' generation/logits_process.py):
the same comparisons, the same sort direction, the same float32 arithmetic, so the -inf masks are identical.
A row whose control is off is left exactly as it was (the callers pass a neutral value or an `enabled` mask).
Sorts are stable, so ties are broken the same way whatever else is in the batch (bf16 logits tie often).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def add_logit_bias(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor):
    """`SequenceBiasLogitsProcessor` with single-token sequences: logits[row, token] += bias."""
    return logits.index_put((rows, token_ids), bias, accumulate=True)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`RepetitionPenaltyLogitsProcessor`: tokens seen (bool [rows, vocab]: prompt and output) get their
    logit divided by the penalty if positive, multiplied if negative."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's (and vLLM's) penalties; Hugging Face has none. counts: occurrences in the output [rows, vocab]."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def suppress(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`MinNewTokensLengthLogitsProcessor` while the minimum is not reached: these tokens get -inf."""
    return logits.index_put((rows, token_ids), torch.tensor(NEG_INF, device=logits.device))


def temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """`TemperatureLogitsWarper`."""
    return logits / temperatures[:, None]


def top_k(logits: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """`TopKLogitsWarper`: drop tokens less likely than the k-th. k: [rows], 0 is off (and so is k >= vocab,
    which removes nothing); max_k = max(k), a host value: the width of the batch's one top-k."""
    kth = logits.topk(max_k, dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
    kth = kth.masked_fill((k == 0)[:, None], NEG_INF)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`TopPLogitsWarper`. threshold: 1 - top_p, computed in double on the host (as Hugging Face's Python
    float), or -1 where top_p is 1 (off)."""
    sorted_logits, order = torch.sort(logits, descending=False, stable=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= threshold[:, None]
    remove[..., -1:] = False  # the most likely token always stays
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """`MinPLogitsWarper`: drop tokens whose probability is below min_p times the top one's (0: off)."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_ps[:, None] * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.topk(1, dim=-1).indices, False)
    return logits.masked_fill(remove, NEG_INF)


def typical_p(logits: torch.Tensor, mass: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    """`TypicalLogitsWarper`: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    normalized = logits.log_softmax(dim=-1)
    p = normalized.exp()
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_scores, order = torch.sort(shifted, descending=False, stable=True)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp_(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last[:, None])
    remove[..., :1] = False
    remove = remove.scatter(1, order, remove) & enabled[:, None]
    return logits.masked_fill(remove, NEG_INF)
