"""What makes a request one that can never run: checked when it is added, so that it fails alone, at once,
with a message that names what is wrong (the worker turns it into INVALID_ARGUMENT)."""

from __future__ import annotations

from worker.engine.sampling_params import SamplingParams


def check_request(
    prompt_token_ids: list[int],
    generated_token_ids: list[int],
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
    kv_capacity_tokens: int,
) -> None:
    """Raise ValueError if the request can never run: an empty prompt, token ids outside the vocabulary (prompt,
    tokens already generated, stop token ids, logit bias), or more tokens than the context or the KV pool."""
    if not prompt_token_ids:
        raise ValueError("empty prompt")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if generated_token_ids and (max(generated_token_ids) >= vocab_size or min(generated_token_ids) < 0):
        raise ValueError(f"generated token ids must be in [0, {vocab_size})")
    total = len(prompt_token_ids) + params.max_new_tokens
    if total > max_model_len:
        raise ValueError(
            f"prompt ({len(prompt_token_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
            f"the model's context of {max_model_len} tokens"
        )
    if total > kv_capacity_tokens:
        raise ValueError(f"request needs {total} KV slots; the whole pool has {kv_capacity_tokens}")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")
    if any(t >= vocab_size for t, _ in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
