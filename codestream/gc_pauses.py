"""How long Python's garbage collector stops a process: every stream the process carries waits meanwhile.

A collection of the oldest generation walks every tracked object; in a gateway relaying hundreds of
streams, or a worker holding hundreds of sequences, that can take milliseconds, and it shows as a gap in
every stream at once (inter-token latency's tail). The gateway and the worker freeze what exists after
start-up (gc.freeze), so only objects made since are walked; this measures what is left.

`track(registry)` adds `codestream_gc_pause_seconds{generation}` to a Prometheus registry; one callback per
process (gc.callbacks) times each collection and feeds every registry tracking it. `PauseLog` keeps the
pauses of a stretch of time in a list (the load generator's own, reported with its results).
"""

from __future__ import annotations

import gc
import time
import weakref

from prometheus_client import CollectorRegistry, Histogram

PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

_histograms: weakref.WeakSet[Histogram] = weakref.WeakSet()
_logs: weakref.WeakSet[PauseLog] = weakref.WeakSet()
_started: list[float] = []  # perf_counter of the collection under way (callbacks come in start/stop pairs)


def _callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started.append(time.perf_counter())
        return
    if not _started:
        return
    pause = time.perf_counter() - _started.pop()
    generation = str(info.get("generation", "?"))
    for histogram in list(_histograms):
        histogram.labels(generation).observe(pause)
    for log in list(_logs):
        log.pauses.append((generation, pause))


def scrape(url: str) -> dict[str, float]:
    """codestream_gc_pause_seconds at a /metrics URL, all generations together: how many collections, their
    total seconds, and how many took over 5 ms."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = {"count": 0.0, "total_s": 0.0, "over_5ms": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != "codestream_gc_pause_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                found["count"] += sample.value
                found["over_5ms"] += sample.value
            elif sample.name.endswith("_sum"):
                found["total_s"] += sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 0.005:
                found["over_5ms"] -= sample.value
    return found


def _install() -> None:
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


def track(registry: CollectorRegistry) -> Histogram:
    """codestream_gc_pause_seconds{generation} in `registry`, fed by this process's collections."""
    histogram = Histogram(
        "codestream_gc_pause_seconds", "time the garbage collector stopped this process, per collection",
        ["generation"], buckets=PAUSE_BUCKETS, registry=registry,
    )  # fmt: skip
    _histograms.add(histogram)
    _install()
    return histogram


class PauseLog:
    """The collections of this process while it is open: (generation, seconds) in order."""

    def __init__(self) -> None:
        self.pauses: list[tuple[str, float]] = []

    def __enter__(self) -> PauseLog:
        _logs.add(self)
        _install()
        return self

    def __exit__(self, *exc: object) -> None:
        _logs.discard(self)

    def summary(self) -> dict[str, float]:
        """count, total and longest pause in ms, and the count of the oldest generation's collections."""
        seconds = [s for _, s in self.pauses]
        return {
            "count": len(seconds),
            "gen2": sum(g == "2" for g, _ in self.pauses),
            "total_ms": round(sum(seconds) * 1e3, 3),
            "max_ms": round(max(seconds, default=0.0) * 1e3, 3),
        }
