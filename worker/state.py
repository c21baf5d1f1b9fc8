"""What the worker keeps per job, and the events of one step waiting to go out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protos import api, bus
from worker.emitter import Emission
from worker.engine import SamplingParams


@dataclass
class Sample:
    generated: list[int] = field(default_factory=list)
    sent_text: str = ""
    finished: bool = False


@dataclass
class Running:
    """A job this worker has taken: where its events go and how far its stream is."""

    job: bus.Job
    entry_id: bytes
    job_bytes: bytes
    attempt: int = 1  # delivery count of the job: the fencing token of this worker's writes
    seq: int = 0  # last event seq emitted (continues an earlier attempt's)
    orphaned: bool = False  # its entry is gone from Redis: running unleased (see leases.py)
    # Per sample, everything delivered so far, so that the job can continue elsewhere (or here, after an
    # engine fault).
    samples: dict[int, Sample] = field(default_factory=dict)
    span: Any = None  # this attempt's OpenTelemetry span (codestream/tracing.py), when tracing is on
    error: str = ""  # why the job failed, when it did
    stop_reason: str = ""  # the last sample's, when it finished

    def __post_init__(self) -> None:
        for index in range(max(1, self.job.params.n)):
            self.samples.setdefault(index, Sample())

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def started(self) -> bool:
        """Whether any token went out (a continuation prefills them instead of starting afresh)."""
        return any(s.generated for s in self.samples.values())

    @property
    def unfinished(self) -> list[int]:
        return [i for i, s in self.samples.items() if not s.finished]

    def restore(self, logged: Iterable[api.GenerateEvent]) -> None:
        """What an earlier attempt delivered, from the request's event log: each sample's tokens and text,
        and which samples finished (an error ends them all)."""
        for event in logged:
            sample = self.samples.setdefault(event.index, Sample())
            if event.HasField("tokens"):
                sample.generated.extend(event.tokens.token_ids)
                sample.sent_text += event.tokens.text
            elif event.HasField("finished"):
                sample.finished = True
            elif event.HasField("error"):
                for s in self.samples.values():
                    s.finished = True

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def engine_params(p: bus.ResolvedParams, prompt_logprobs: bool) -> SamplingParams:
    """The job's resolved parameters as the engine takes them."""
    return SamplingParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed, max_new_tokens=p.max_new_tokens,
        stop=tuple(p.stop), ignore_eos=p.ignore_eos, logprobs=p.logprobs, min_p=p.min_p,
        typical_p=p.typical_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        logit_bias=tuple(sorted(p.logit_bias.items())), min_new_tokens=p.min_new_tokens,
        stop_token_ids=tuple(p.stop_token_ids), include_stop_sequence=p.include_stop_sequence,
        prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


@dataclass
class Outbox:
    """Events of one step, in order, for one emit (see emitter.py)."""

    emissions: list[Emission] = field(default_factory=list)

    def add(self, req: Running, event: api.GenerateEvent, final: bool = False) -> None:
        self.emissions.append(
            Emission(
                request_id=req.request_id,
                attempt=req.attempt,
                seq=event.seq,
                event=event.SerializeToString(),
                channel=req.job.reply_channel,
                entry_id=req.entry_id if final else None,
            )
        )

    def __bool__(self) -> bool:
        return bool(self.emissions)
