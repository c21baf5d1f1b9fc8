"""The bus benchmark's measurements (CPU time per process and thread, Redis' pub/sub backlog, percentiles)
and its report."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
from array import array
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import redis

# ------------------------------------------------------------------------------------------- measurements


class CpuMeter:
    """CPU seconds of the given processes and of Redis between construction and stop(), and those of the
    server (the first of `pids`) per thread: its main thread runs the event loop, so all of its Python;
    the others are gRPC's."""

    def __init__(self, redis_url: str, pids: dict[str, int]) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.pids = pids
        self.server = next(iter(pids))
        self._before = self._sample()
        self._threads_before = thread_cpu_s(pids[self.server])
        self.seconds: dict[str, float] = {}
        self.server_threads: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        info = self.redis.info("cpu")
        redis_s = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return {name: proc_cpu_s(pid) for name, pid in self.pids.items()} | {"redis": redis_s}

    def stop(self) -> None:
        after = self._sample()
        self.seconds = {k: round(after[k] - self._before[k], 3) for k in after}
        threads = thread_cpu_s(self.pids[self.server])
        deltas = {k: v - self._threads_before.get(k, 0.0) for k, v in threads.items()}
        self.server_threads = {k: round(v, 3) for k, v in sorted(deltas.items(), key=lambda kv: -kv[1]) if v >= 0.01}
        self.redis.close()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads, from /proc/<pid>/stat."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread ("main") and of its other threads by name, summed per name
    (gRPC's C-core names its threads; Python's are all "python")."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            out[name] += _stat_cpu_s((task / "stat").read_text())
    return dict(out)


def _stat_cpu_s(stat: str) -> float:
    # After the ")" that closes the command name, utime and stime are the 12th and 13th fields.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BacklogWatch:
    """Samples, in a thread, how many bytes Redis holds queued for its pub/sub subscribers (the gateway),
    and keeps the most seen: where the backlog sits when the worker runs ahead of the gateway."""

    def __init__(self, redis_url: str, every_s: float = 0.2) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="backlog-watch", daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for client in self.redis.client_list(_type="pubsub"):
                self.max_bytes = max(self.max_bytes, int(client.get("omem", 0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.redis.close()


def value_span(values: list[float]) -> list[float]:
    return [min(values), max(values)] if values else []


def percentiles(samples_ms: array) -> dict[str, float]:
    """Nearest-rank percentiles, in ms."""
    if not samples_ms:
        return {}
    s = sorted(samples_ms)

    def at(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))], 3)

    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": round(s[-1], 3), "n": len(s)}


# ------------------------------------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    import google.protobuf
    from google.protobuf.internal import api_implementation

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nbus: one gateway, Redis {report['redis_version']}, {m['cpus']} CPUs ({m['cpu_model']}), no model")
    print(
        f"{'phase':<11}{'streams':>8}{'tokens':>7}{'ok':>6}{'errors':>7}{'events':>9}{'messages':>9}{'events/s':>10}"
        f"{'server CPU s':>14}{'events/CPU-s':>14}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}"
    )
    for p in report["phases"]:
        # Latency under a flood is time queued behind the backlog, not the hop: shown for the latency phase only.
        lat = [f"{p['latency_ms'][k]:>8.2f}" for k in ("p50", "p90", "p99")] if p["interval_ms"] else [f"{'-':>8}"] * 3
        print(
            f"{p['name']:<11}{p['streams']:>8}{p['tokens']:>7}{p['streams_completed']:>6}{p['errors']:>7}"
            f"{p['token_events']:>9}{p['token_messages']:>9}{p['events_per_s']:>10,}{p['cpu_s'][p['server']]:>14.2f}"
            f"{p['events_per_server_cpu_s']:>14,}{''.join(lat)}"
        )
    print("server: the gateway process; for grpc-floor, a bare grpc.aio server (no Redis, no gateway logic)")
    for p in report["phases"]:
        name = p["name"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_s"].items())
        threads = ", ".join(f"{k} {v:.2f}" for k, v in p["server_threads_cpu_s"].items())
        print(f"{name}: {p['window_s']:.1f} s first to last token; CPU s: {cpu} ({p['server']} threads: {threads})")
        if p["open_ms"]:
            o = p["open_ms"]
            print(f"{name}: call -> Queued: p50 {o['p50']:.1f} ms, p90 {o['p90']:.1f}, max {o['max']:.1f}")
        if p["max_pubsub_backlog_bytes"]:
            print(f"{name}: most bytes Redis held for a subscriber: {p['max_pubsub_backlog_bytes']:,}")
        if "redis_only_latency_ms" in p:
            lat = p["redis_only_latency_ms"]
            print(
                f"{name}: Redis hop alone (probe): p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f}, p99 {lat['p99']:.2f}"
            )
        if p["errors"]:
            first, last = p["errors_after_s"]
            print(f"{name}: {p['errors']} streams failed, {first:.1f} to {last:.1f} s after the start:")
        for e in p["error_samples"]:
            print(f"{name}: error: {e}")


def print_profile(path: str, top: int = 25) -> None:
    import pstats

    print(f"\ngateway profile ({path}), top {top} by own time (gRPC's Cython shows up inside Context.run):")
    pstats.Stats(path).sort_stats("tottime").print_stats(top)
