"""codestream.gc_pauses: the garbage collector's pauses, as a Prometheus histogram and as a log of one stretch."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, start_http_server

from codestream import gc_pauses
from codestream.redis_server import free_port


def count(registry: CollectorRegistry, generation: str) -> float:
    return registry.get_sample_value("codestream_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_each_collection_is_timed_into_every_registry_tracking_it_and_into_open_logs() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    gc_pauses.track(first)
    gc_pauses.track(second)
    with gc_pauses.PauseLog() as log:
        gc.collect()  # a full collection: generation 2
        gc.collect(0)
    after = gc_pauses.PauseLog()
    gc.collect()
    assert count(first, "2") >= 1 and count(second, "2") >= 1 and count(first, "0") >= 1
    assert [g for g, _ in log.pauses].count("2") >= 1 and all(seconds >= 0 for _, seconds in log.pauses)
    summary = log.summary()
    assert summary["count"] == len(log.pauses) >= 2 and summary["gen2"] >= 1
    assert summary["max_ms"] <= summary["total_ms"]
    assert after.pauses == []  # a log records only while it is open
    assert gc.callbacks.count(gc_pauses._callback) == 1


def test_scrape_reads_the_histogram_back_from_a_metrics_endpoint() -> None:
    registry = CollectorRegistry()
    histogram = gc_pauses.track(registry)
    histogram.labels("1").observe(0.002)
    histogram.labels("2").observe(0.02)  # over 5 ms
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        found = gc_pauses.scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        thread.join(timeout=5)
    # (collections of this process since track() may add to the counts: at least the two observed ones)
    assert found["count"] >= 2 and 1 <= found["over_5ms"] <= found["count"] - 1 and found["total_s"] >= 0.022
