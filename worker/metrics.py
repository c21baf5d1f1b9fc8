"""Worker metrics (prometheus-client), served on their own HTTP port (`--metrics-port`).

Counters are read at scrape time from what the worker and engine already count (`Worker.counts`,
`LLMEngine.stats()`), so there is no second bookkeeping to drift; the step histograms are observed by the
engine loop, once per step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from codestream import gc_pauses

if TYPE_CHECKING:
    from worker.service import Worker

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 256, 384, 512)
# Worker.counts keys exported as counters: name -> help.
COUNTS = {
    "taken": "jobs taken from the stream (new and reclaimed)",
    "reclaimed": "jobs taken over from a worker that stopped renewing its lease",
    "handed_back": "jobs handed to other workers at shutdown",
    "requeued": "jobs enqueued anew at shutdown (Redis had lost their entries)",
    "stale_dropped": "jobs dropped unrun, read long past their deadlines",
    "lease_lost": "jobs this worker lost to another after missing its lease",
    "fenced_writes": "events refused because another attempt owns the job",
    "dead_lettered": "jobs sent to the dead-letter stream",
    "poisoned": "requests the engine failed on",
    "prompt_tokens": "prompt tokens admitted to the engine",
    "generated_tokens": "tokens generated",
}


class WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator:
        worker = self.worker
        stats = worker.engine.stats()
        for name, value, help_text in (
            ("running_requests", stats.num_running, "sequences in the running batch"),
            ("waiting_requests", stats.num_waiting, "sequences waiting for the engine"),
            ("kv_cache_usage_ratio", 1 - stats.num_free_blocks / stats.num_blocks, "share of KV blocks in use"),
            ("prefix_cache_hit_rate", stats.prefix_cache_hit_rate, "prompt tokens whose prefill was reused"),
        ):
            yield GaugeMetricFamily(f"codestream_worker_{name}", help_text, value=value)
        yield CounterMetricFamily("codestream_worker_preemptions", "sequences preempted", value=stats.num_preemptions)
        yield from engine_time(worker)
        for key, help_text in COUNTS.items():
            yield CounterMetricFamily(f"codestream_worker_{key}", help_text, value=worker.counts[key])
        finished = CounterMetricFamily(
            "codestream_worker_requests_finished", "requests ended, by reason", labels=["reason"]
        )
        for key, value in worker.counts.items():
            if key.startswith("STOP_REASON_") or key.startswith("failed_"):
                finished.add_metric([key.removeprefix("STOP_REASON_").lower()], value)
        yield finished


def engine_time(worker: Worker) -> Iterator:
    """Where the engine's time goes, cumulative: its own host phases per step (LLMEngine.step_timing), and the
    worker's loop turns that stepped it (LoopTime). The loop's "step" part less the engine's phases is the
    hand-over to the engine thread and back."""
    timing = worker.engine.step_timing
    phases = CounterMetricFamily(
        "codestream_worker_engine_host_seconds", "time inside engine steps, by phase", labels=["phase"]
    )
    phases.add_metric(["schedule"], timing.schedule_s)
    phases.add_metric(["launch"], timing.launch_s)
    phases.add_metric(["gpu_wait"], timing.sample_s)  # waiting for the step's tokens, sampling included
    phases.add_metric(["outputs"], timing.outputs_s)
    yield phases
    yield CounterMetricFamily("codestream_worker_engine_steps", "engine steps read", value=timing.steps)
    ahead = "steps launched before the previous one was read"
    yield CounterMetricFamily("codestream_worker_engine_steps_ahead", ahead, value=timing.steps_ahead)
    early = "steps launched before the previous one's outputs were returned"
    yield CounterMetricFamily("codestream_worker_engine_steps_early", early, value=timing.steps_early)
    loop = CounterMetricFamily(
        "codestream_worker_loop_seconds", "engine loop turns that ran a step, by part", labels=["part"]
    )
    for part in LoopTime.PARTS:
        loop.add_metric([part], worker.loop_time.seconds[part])
    yield loop


class LoopTime:
    """Wall time of the worker's engine loop turns that ran a step, by part: applying adds, aborts and
    deadlines (prepare), the step on the engine thread, turning its outputs into events (collect), starting
    their publish, waiting for the previous step's publish, and the rest. Everything but the step is time
    the engine waits for the loop unless a step was launched ahead (lookahead.py)."""

    PARTS = ("prepare", "step", "collect", "publish", "publish_wait", "rest")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    def add(self, turn: Turn) -> None:
        for part, seconds in turn.parts.items():
            self.seconds[part] += seconds


class Turn:
    """One loop turn's clock: each mark charges the time since the previous one to a part."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def mark(self, part: str) -> float:
        """The time since the previous mark goes to `part`; returns now."""
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now
        return now


class WorkerMetrics:
    def __init__(self, worker: Worker) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(WorkerCollector(worker))
        self.gc_pauses = gc_pauses.track(self.registry)
        self.step_seconds = Histogram(
            "codestream_worker_step_seconds", "engine step wall time", buckets=STEP_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "codestream_worker_batch_size", "sequences per engine step", buckets=BATCH_BUCKETS, registry=self.registry
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if port > 0:
            start_http_server(port, addr=host, registry=self.registry)
