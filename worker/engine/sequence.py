"""A sequence: one request's tokens and where it stands in the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.sampler import TokenLogprobs
from worker.engine.sampling_params import SamplingParams


def sample_key(request_id: str, index: int) -> str:
    return f"{request_id}#{index}" if index else request_id


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # has KV blocks; being prefilled or decoded
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens, or the model's context is full
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"  # cancelled from outside (cancel, deadline, shutdown): the caller knows why


@dataclass
class Sequence:
    request_id: str
    # Prompt followed by the generated tokens.
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.time)
    # Which of the request's samples this is (sampling.n > 1): 0 for the first, which prefills the prompt.
    index: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose K/V are in the cache. Less than len(token_ids) while (chunked) prefill is under way or
    # after a preemption; len(token_ids) - 1 in steady decode (the last sampled token is not yet fed).
    num_computed_tokens: int = 0
    # Physical KV block of each logical block, in order.
    block_table: list[int] = field(default_factory=list)
    # Chained prefix hash of each full block, for prefix caching (see block_manager.py).
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    # Wall-clock times (time.time()) for the worker's timing report.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    # With params.prompt_logprobs: entry i is prompt token i + 1's log-probability, filled as the prompt is
    # prefilled (chunk by chunk); None once handed out with the first output (or when not wanted).
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def key(self) -> str:
        """Unique within the engine: the request id, plus the sample index for samples after the first."""
        return sample_key(self.request_id, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
