"""What the engine reports: each request's output of a step, the host time of its steps, its counts."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.sampler import TokenLogprobs
from worker.engine.sequence import FinishReason


@dataclass
class RequestOutput:
    """What one step (or an abort) produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text: str  # whole characters only; may be empty
    finished: bool
    index: int = 0  # the sample (sampling.n > 1)
    finish_reason: FinishReason | None = None
    # The stop string that ended the generation (STOP_SEQUENCE); "" otherwise, also when a stop token id
    # ended it (reported as EOS: the protocol has no stop-token reason, and the token is not in the text).
    stop_sequence: str = ""
    # One entry per token of new_token_ids (params.logprobs >= 0), under the model's raw distribution.
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # params.prompt_logprobs, in the request's first output only: entry i is prompt token i + 1's.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # Wall-clock (time.time()) marks, for timing reports.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class StepTiming:
    """Cumulative host time per phase of step(): where a step's wall time goes."""

    steps: int = 0
    schedule_s: float = 0.0  # scheduling and laying out the step's inputs
    launch_s: float = 0.0  # copying inputs and enqueuing the forward pass (or replaying its graph)
    # Waiting for the GPU to finish the step (its sampling included) when its tokens are read. The phases
    # add up to the time inside step(): a step launched ahead ran on while the host did other work.
    sample_s: float = 0.0
    outputs_s: float = 0.0  # detokenization, stop checks, outputs
    batch_tokens: int = 0
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens were read (lookahead.py)
    steps_early: int = 0  # steps launched before the previous step's outputs were returned (lookahead.py)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    prefix_cache_hit_rate: float  # prompt tokens whose prefill was skipped / prompt tokens scheduled
