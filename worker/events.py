"""Conversion of engine outputs into wire events (pure functions: no I/O)."""

from __future__ import annotations

import time

import grpc

from protos import api, bus
from worker.engine import FinishReason, RequestOutput, TokenLogprobs
from worker.engine.sampler import sample_seed

STOP_REASONS = {
    FinishReason.LENGTH: api.STOP_REASON_LENGTH,
    FinishReason.EOS: api.STOP_REASON_EOS,
    FinishReason.STOP_SEQUENCE: api.STOP_REASON_STOP_SEQUENCE,
}


def token_chunk(request_id: str, seq: int, out: RequestOutput) -> api.GenerateEvent:
    return api.GenerateEvent(
        request_id=request_id,
        seq=seq,
        index=out.index,
        tokens=api.TokenChunk(
            token_ids=out.new_token_ids,
            text=out.text,
            logprobs=[_logprob(lp) for lp in out.logprobs],
            prompt_logprobs=[_logprob(lp) for lp in out.prompt_logprobs],
        ),
    )


def finished(
    job: bus.Job,
    seq: int,
    stop_reason: int,
    *,
    out: RequestOutput | None = None,
    now: float | None = None,
    index: int = 0,
) -> api.GenerateEvent:
    """The Finished event. stop_reason: an api.StopReason value (see STOP_REASONS for engine reasons)."""
    now = time.time() if now is None else now
    accepted = job.accepted_unix_ms / 1000

    def since_accepted(t: float | None) -> float:
        return max(0.0, (t - accepted) * 1000) if t is not None else 0.0

    return api.GenerateEvent(
        request_id=job.request_id,
        seq=seq,
        index=out.index if out else index,
        finished=api.Finished(
            stop_reason=stop_reason,
            stop_sequence=out.stop_sequence if out else "",
            prompt_tokens=out.num_prompt_tokens if out else len(job.prompt_token_ids),
            generated_tokens=out.num_generated_tokens if out else 0,
            seed=sample_seed(job.params.seed, out.index if out else index),
            timings=api.Timings(
                queue_ms=since_accepted(out.first_scheduled_time if out else None),
                first_token_ms=since_accepted(out.first_token_time if out else None),
                total_ms=since_accepted(now),
            ),
        ),
    )


def error(request_id: str, seq: int, code: grpc.StatusCode, message: str) -> api.GenerateEvent:
    return api.GenerateEvent(request_id=request_id, seq=seq, error=api.Error(code=code.value[0], message=message))


def _logprob(lp: TokenLogprobs) -> api.TokenLogprob:
    return api.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[api.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )
