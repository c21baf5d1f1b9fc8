"""The hardware floors of W1, S1 and T1: what an ideal engine could reach on the card of this run.

Inputs are the model's counts (`ModelFacts`) and the two ceilings measured in the same run: HBM bandwidth
B (bytes/s, from a device-to-device copy) and the dense matrix rate R (FLOP/s, from a square matmul).
Every formula is a lower bound on time that ignores everything but the dominant traffic or arithmetic:

* decode step (memory-bound): reads the weights once (all but the input-embedding table, of which only
  the batch's rows are read) plus the K/V of every token the batch attends to;
* prefill (compute-bound): 2 FLOPs per weight per prompt token through all matmul weights, the LM head for
  the one sampled row, and causal attention: QKᵀ and PV, 4·heads·head_dim FLOPs per (query, key) pair with
  L(L+1)/2 pairs per layer; for a prompt short enough that reading the weights once takes longer, that.

Times are floors, throughputs ceilings; "% of floor" is floor / measured for times, measured / ceiling for
throughputs, so 100% means at the hardware's limit either way.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.engine_setup import ModelFacts, Workloads


def prefill_flops(m: ModelFacts, prompt_len: int) -> float:
    attention = 4 * m.num_layers * m.num_heads * m.head_dim * prompt_len * (prompt_len + 1) / 2
    return 2 * m.matmul_params * prompt_len + 2 * m.lm_head_params + attention


def s1_tpot_floor_s(m: ModelFacts, bandwidth: float, w: Workloads) -> float:
    """One decode step at batch 1: weights + the K/V of the mean context over S1's decode steps.

    The step producing generated token j (j = 2..n) attends prompt + j - 1 tokens, so the mean context is
    prompt + n/2.
    """
    mean_context = w.s1_prompt + w.s1_new_tokens / 2
    return (m.weight_bytes_per_step + mean_context * m.kv_bytes_per_token) / bandwidth


def prefill_floor_s(m: ModelFacts, bandwidth: float, matrix_rate: float, prompt_len: int) -> float:
    """Time to first token: the prefill's arithmetic, or for a short prompt reading the weights once."""
    return max(prefill_flops(m, prompt_len) / matrix_rate, m.weight_bytes_per_step / bandwidth)


def w1_floor(
    m: ModelFacts,
    bandwidth: float,
    matrix_rate: float,
    prompt_lens: list[int],
    new_tokens: int,
    kv_capacity_tokens: int,
    max_num_seqs: int,
) -> dict[str, Any]:
    """W1's best output throughput: an ideal schedule, serial prefill then KV-capacity-bound decode.

        T = prefill FLOPs / R  +  max(decode bytes / B, decode FLOPs / R)
        decode bytes = steps · weights per step + Σ over decode tokens of (context attended) · KV bytes/token
        steps = ⌈decode tokens / batch⌉,  batch = min(requests, max_num_seqs, ⌊KV capacity / mean occupancy⌋)

    Each request's first token comes out of its prefill; its other n - 1 come from decode steps, the j-th
    attending prompt + j tokens. The K/V read is fixed by the workload whatever the batch; the batch only
    sets how often the weights are read. A request holds prompt + j tokens of the pool at its j-th step,
    prompt + n/2 on average over its life: an ideal scheduler keeps the pool full of requests at staggered
    stages, so the batch is the pool's capacity over that mean occupancy. Prefill and decode are not
    overlapped here (a mixed-batch engine can hide some prefill arithmetic under decode's memory traffic,
    so it could in principle beat this figure slightly).
    """
    n = new_tokens
    num_requests = len(prompt_lens)
    prefill_s = sum(prefill_flops(m, p) for p in prompt_lens) / matrix_rate

    decode_tokens = num_requests * (n - 1)
    # Σ_i Σ_{j=1}^{n-1} (p_i + j)
    context_tokens = sum((n - 1) * p + (n - 1) * n / 2 for p in prompt_lens)
    mean_occupancy = sum(prompt_lens) / num_requests + n / 2
    batch = max(1, min(num_requests, max_num_seqs, int(kv_capacity_tokens // mean_occupancy)))
    steps = math.ceil(decode_tokens / batch)
    decode_bytes = steps * m.weight_bytes_per_step + context_tokens * m.kv_bytes_per_token
    attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * context_tokens
    decode_flops = 2 * (m.matmul_params + m.lm_head_params) * decode_tokens + attention_flops
    decode_s = max(decode_bytes / bandwidth, decode_flops / matrix_rate)

    total_s = prefill_s + decode_s
    return {
        "tokens_per_s": num_requests * n / total_s,
        "time_s": total_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_memory_s": decode_bytes / bandwidth,
        "decode_compute_s": decode_flops / matrix_rate,
        "batch": batch,
        "decode_steps": steps,
        "kv_read_bytes": context_tokens * m.kv_bytes_per_token,
        "weight_read_bytes": steps * m.weight_bytes_per_step,
        "kv_capacity_tokens": kv_capacity_tokens,
        "mean_occupancy_tokens": mean_occupancy,
        "formula": (
            "T = prefill_flops/R + max(decode_bytes/B, decode_flops/R); decode_bytes = steps*weight_bytes_per_step"
            " + sum_i sum_{j=1..n-1} (prompt_i + j)*kv_bytes_per_token; steps = ceil(requests*(n-1)/batch);"
            " batch = min(requests, max_num_seqs, floor(kv_capacity_tokens/(mean prompt + n/2)));"
            " tokens_per_s = requests*n/T"
        ),
    }


def floors(
    m: ModelFacts,
    ceilings: dict[str, Any],
    w: Workloads,
    w1_prompt_lens: list[int],
    kv_capacity_tokens: int | None,
    max_num_seqs: int,
) -> dict[str, Any]:
    """Every floor; W1's needs the engine's KV pool size (None where the engine did not start)."""
    bandwidth, rate = ceilings["bandwidth_bytes_per_s"], ceilings["matmul_flops_per_s"]
    s1_ttft, s1_tpot = prefill_floor_s(m, bandwidth, rate, w.s1_prompt), s1_tpot_floor_s(m, bandwidth, w)
    return {
        "s1_tpot_s": s1_tpot,
        "s1_ttft_s": s1_ttft,
        # S1's output tokens over its whole stream: first token, then n - 1 decode steps.
        "s1_tokens_per_s": w.s1_new_tokens / (s1_ttft + (w.s1_new_tokens - 1) * s1_tpot),
        "t1_ttft_s": prefill_floor_s(m, bandwidth, rate, w.t1_prompt),
        "w1": w1_floor(m, bandwidth, rate, w1_prompt_lens, w.w1_new_tokens, kv_capacity_tokens, max_num_seqs)
        if kv_capacity_tokens
        else None,
        "s1_formula": "(weight_bytes_per_step + (s1_prompt + n/2) * kv_bytes_per_token) / B",
        "ttft_formula": (
            "max((2*matmul_params*L + 2*lm_head_params + 4*layers*heads*head_dim*L(L+1)/2) / R,"
            " weight_bytes_per_step / B)"
        ),
        "weight_bytes_per_step": m.weight_bytes_per_step,
        "kv_bytes_per_token": m.kv_bytes_per_token,
    }
