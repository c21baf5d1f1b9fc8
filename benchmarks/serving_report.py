"""The serving benchmark's report (benchmarks/serving.py): the machine it ran on, each target of the issue
measured against its figure, and the printed table."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import cpu_idle
from codestream import idle_spin


def cpu_times() -> dict[str, float]:
    """The machine's CPU seconds by state, all CPUs together (/proc/stat): under a hypervisor, `steal` is the
    time our virtual CPUs were ready to run but the host ran something else (a stall no profile shows)."""
    with contextlib.suppress(OSError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        return {n: int(v) / os.sysconf("SC_CLK_TCK") for n, v in zip(names, fields, strict=False)}
    return {}


def load_line(result: dict[str, Any]) -> str:
    """One load's figures and what went on meanwhile (serving.measure), on one line."""
    s, gc, halts = result["summary"], result["gc"], result["machine_pauses"]
    pauses = [
        f"{n} {g['count']:.0f} ({g['total_s'] * 1e3:.1f} ms, {g['over_5ms']:.0f} > 5 ms)"
        for n, g in gc.items()
        if n != "client"
    ]
    client = gc["client"]
    pauses.append(f"client {client['count']} ({client['total_ms']:.1f} ms, longest {client['max_ms']:.1f} ms)")
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_s"].items() if k in ("user", "system", "idle", "steal"))
    work = ", ".join(f"{p:.0f}/{m:.0f} µs" for p, m in zip(halts["work_p99_us"], halts["work_max_us"], strict=True))
    return (
        f"{s['completed']}/{s['requests']} ok, {s['errors']} errors, {s['output_throughput']:,.1f} tok/s, "
        f"TTFT median {s['ttft_ms'].get('median', 0):.2f} ms, ITL median/p99 {s['itl_ms'].get('median', 0):.2f}/"
        f"{s['itl_ms'].get('p99', 0):.2f} ms; GC pauses: {', '.join(pauses)}; CPU s (all CPUs): {cpu}; "
        f"machine paused {halts['machine_pauses']} times ({halts['machine_pauses_over_5ms']} over 5 ms, longest "
        f"{halts['machine_pause_max_ms']:.1f} ms); probes' 50 µs of work p99/max {work}"
    )


def machine() -> dict[str, Any]:
    idle = cpu_idle.describe()
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in cpu_info() if ln.startswith("model name")), ""),
        "python": sys.version.split()[0],
        "kernel": idle["kernel"],
        "idle_driver": idle["idle_driver"],
        "pm_qos_request_us": idle["pm_qos_request_us"],
        "idle_cpus_halt_in_a_vm": idle_spin.idle_cpus_halt_in_a_vm(),  # (wake-ups go through the hypervisor)
        "idle_cpus_spin": os.environ.get("CODESTREAM_BENCH_SPIN_IDLE", ""),  # (serving.py, SPIN_IDLE)
        "processes_pinned": os.environ.get("CODESTREAM_BENCH_PIN") == "1",  # (serving.py, PIN)
        "cpu0_siblings": cpu_idle.read_value(Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")) or "",
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(Exception):
        import grpc

        info["grpcio"] = grpc.__version__
    return info


def cpu_info() -> list[str]:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text().splitlines()
    return []


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue, measured: value and whether it is met."""
    found: dict[str, Any] = {}
    engine, service = report.get("engine"), report.get("service", {})
    if engine and "w1" in service:
        ours = service["w1"]["summary"]["output_throughput"]
        share = ours / engine["w1"]["tokens_per_s"]
        found["w1_through_grpc_share"] = {"value": round(share, 4), "target": ">= 0.95", "met": share >= 0.95}
    if engine and "ttft" in service:
        s = service["ttft"]["summary"]
        added = s["ttft_ms"]["median"] - engine["ttft_ms"]["median"]
        found["ttft_added_ms"] = {"value": round(added, 3), "target": "<= 2", "met": added <= 2}
        if "ttft_sync_client" in service:
            sync = service["ttft_sync_client"]["summary"]["ttft_ms"]["median"] - engine["ttft_ms"]["median"]
            found["ttft_added_sync_client_ms"] = {"value": round(sync, 3), "target": "<= 2", "met": sync <= 2}
        # Where it goes (medians): gateway accepted -> engine scheduled, the engine's own TTFT inside the
        # worker, and client -> gateway + engine -> client.
        found["ttft_breakdown_ms"] = {
            "accepted_to_scheduled": s["server_queue_ms"].get("median"),
            "scheduled_to_first_token": round(s["server_ttft_ms"]["median"] - s["server_queue_ms"]["median"], 3)
            if s["server_ttft_ms"]
            else None,
            "outside_accepted_to_first_token": s["ttft_outside_engine_ms"].get("median"),
        }
    c32 = service.get("sweep", {}).get("32")
    if c32:
        itl = c32["summary"]["itl_ms"]
        ratio = itl["p99"] / itl["median"]
        found["itl_p99_over_median_c32"] = {"value": round(ratio, 3), "target": "<= 2", "met": ratio <= 2}
    if service.get("sweep"):
        errors = sum(r["summary"]["errors"] for r in service["sweep"].values())
        found["sweep_errors"] = {"value": errors, "levels": list(service["sweep"]), "met": errors == 0}
    if "bus" in report:
        paced = report["bus"]["paced-256x5ms"]["phases"][0]
        found["bus_events_per_s"] = {"value": paced["events_per_s"], "target": ">= 50,000",
                                     "met": paced["events_per_s"] >= 50_000}  # fmt: skip
    return found


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nserving: {report['shape']} on {m.get('gpu', 'CPU')}, {m['cpus']} CPUs, torch {m.get('torch')}")
    engine, service = report.get("engine"), report.get("service", {})
    if engine:
        print(f"engine alone: W1 {engine['w1']['tokens_per_s']:,.1f} tok/s; low-load TTFT {fmt(engine['ttft_ms'])}")
    rows = [("ttft (low load)", service.get("ttft")), ("ttft (sync client)", service.get("ttft_sync_client"))]
    rows.append(("W1 (all at once)", service.get("w1")))
    rows += [(f"c={c}", r) for c, r in service.get("sweep", {}).items()]
    header = f"{'through gRPC + Redis':<20}{'ok':>6}{'err':>5}{'out tok/s':>11}{'req/s':>8}"
    print(header + "".join(f"{n + ' med/p90/p99 ms':>32}" for n in ("TTFT", "TPOT", "ITL", "E2E")))
    for name, result in rows:
        if result:
            s = result["summary"]
            print(
                f"{name:<20}{s['completed']:>6}{s['errors']:>5}{s['output_throughput']:>11,.1f}"
                f"{s['request_throughput']:>8.2f}"
                + "".join(f"{fmt(s[k + '_ms']):>32}" for k in ("ttft", "tpot", "itl", "e2e"))
            )
    for name, t in report["targets"].items():
        if "value" in t:
            print(f"target {name}: {t['value']} ({t.get('target', '')}) {'met' if t['met'] else 'NOT met'}")
        else:
            print(f"{name}: {t}")


def fmt(p: dict[str, float]) -> str:
    return f"{p['median']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}" if p else "-"
