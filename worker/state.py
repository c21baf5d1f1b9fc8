"""What the worker keeps per job, and the events of one step waiting to go out."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import api, bus
from worker.emitter import Emission


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
    # Per sample, everything delivered so far, so that the job can continue elsewhere (or here, after an
    # engine fault).
    samples: dict[int, Sample] = field(default_factory=dict)

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

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


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
