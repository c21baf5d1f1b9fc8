"""The whole-machine pause probe (benchmarks/hiccups.py): what counts as the machine pausing."""

from __future__ import annotations

import time

from benchmarks import hiccups


def test_a_pause_is_a_hiccup_every_probe_had_at_once() -> None:
    out = {
        "a": [(100.000, 100.006), (100.500, 100.503), (101.000, 101.004)],
        "b": [(100.0004, 100.0062), (100.800, 100.803), (101.0009, 101.0078)],
    }
    probes = hiccups.Probes(count=2)
    for who, spans in out.items():
        text = "".join(f"HOP probe-{who} hiccup_start {a:.6f}\nHOP probe-{who} hiccup_end {b:.6f}\n" for a, b in spans)
        probes.hiccups += hiccups.parse(text + "a line of something else\n")
    probes.hiccups.sort()
    summary = probes.summary()
    # Together at 100.000 (shortest 5.8 ms) and 101.000 (4.0 ms); 100.5 and 100.8 are one probe's each.
    assert summary["hiccups"] == 6
    assert summary["machine_pauses"] == 2
    assert summary["machine_pause_max_ms"] == 5.8
    assert summary["machine_pauses_over_5ms"] == 1
    assert summary["machine_pause_total_ms"] == 9.8


def test_probes_run_as_processes_around_a_block_and_report_what_they_saw() -> None:
    with hiccups.Probes(count=2) as probes:
        time.sleep(0.3)
    assert [p.returncode for p in probes.processes] == [0, 0]  # (interrupted while running, and wrote their work)
    summary = probes.summary()
    assert summary["probes"] == 2
    assert summary["machine_pauses"] <= summary["hiccups"]
    assert all(b > a for a, b, _ in probes.hiccups)
    assert len(probes.work) == 2 and all(w["count"] > 10 for w in probes.work)  # (~1 ms a round, 0.3 s)
    assert all(0 < w["median_us"] <= w["p99_us"] <= w["max_us"] for w in probes.work)
    assert len(summary["work_median_us"]) == 2
