"""Whole-machine pauses: a probe that sleeps 1 ms again and again and notes every wake-up that came late.

A process that asks for nothing but a CPU now and then is late only when the machine did not run it. On the
lent GPU machines (KVM guests) probes in separate processes are late together, by 3-7 ms, a few times a
minute (run 69): the guest as a whole stops, and so does every process of the stack. A stall like that
during a load shows as a gap in every stream at once; a few of them in a short load are enough to move an
inter-token p99. The serving benchmark runs probes next to each measurement and reports what they saw, so
that a tail can be told apart from the service's own.

    python -m benchmarks.hiccups 60            # one probe for 60 s: `HOP probe-<pid> hiccup_start/end <t>`
    with Probes() as probes: ...; probes.summary()   # two probes around a block of code
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

LATE_S = 0.001  # a wake-up more than this late is a hiccup
TICK_S = 0.001


def probe(seconds: float, tick_s: float = TICK_S, late_s: float = LATE_S) -> None:
    """Sleep `tick_s` again and again for `seconds`; write each late wake-up as two HOP lines (the format of
    benchmarks/ttft_hops.py, whose `stalls` lists them next to the stalls they may explain). After each
    wake-up, time a fixed piece of work (~50 µs): a CPU that runs slow for a while (a busy sibling
    hyperthread, a lower clock) shows there without any late wake-up; the work's times go out at the end, as
    `WORK <probe> <count> <median µs> <p99 µs> <max µs> <count over 2x the median>`."""
    who, end = f"probe-{os.getpid()}", time.time() + seconds
    spins = calibrate()
    work: list[float] = []
    try:
        while (before := time.time()) < end:
            time.sleep(tick_s)
            after = time.time()
            if after - before > tick_s + late_s:
                sys.stdout.write(f"HOP {who} hiccup_start {before:.6f}\nHOP {who} hiccup_end {after:.6f}\n")
                sys.stdout.flush()
            started = time.perf_counter()
            busy(spins)
            work.append((time.perf_counter() - started) * 1e6)
    finally:
        if work:
            work.sort()
            median = work[len(work) // 2]
            over = sum(w > 2 * median for w in work)
            sys.stdout.write(
                f"WORK {who} {len(work)} {median:.1f} {work[int(0.99 * (len(work) - 1))]:.1f} {work[-1]:.1f} {over}\n"
            )
            sys.stdout.flush()


def busy(spins: int) -> int:
    total = 0
    for i in range(spins):
        total += i
    return total


def calibrate(target_s: float = 50e-6) -> int:
    """How many spins of `busy` take about `target_s` here (the fastest of a few tries)."""
    fastest = min(_timed(100_000) for _ in range(5))
    return max(100, int(100_000 * target_s / fastest))


def _timed(spins: int) -> float:
    started = time.perf_counter()
    busy(spins)
    return time.perf_counter() - started


def parse_work(text: str) -> list[dict[str, float]]:
    """The work times a probe wrote at its end (`probe`'s WORK line)."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 7 and parts[0] == "WORK":
            count, median, p99, most, over = map(float, parts[2:])
            found.append({"count": count, "median_us": median, "p99_us": p99, "max_us": most, "over_2x": over})
    return found


def parse(text: str) -> list[tuple[float, float, str]]:
    """(start, end, probe) of each hiccup in a probe's output."""
    starts: dict[str, float] = {}
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[0] != "HOP":
            continue
        _, who, name, at = parts
        if name == "hiccup_start":
            starts[who] = float(at)
        elif name == "hiccup_end" and who in starts:
            found.append((starts.pop(who), float(at), who))
    return sorted(found)


@dataclass
class Probes:
    """`count` probe processes for the duration of a `with` block."""

    count: int = 2
    processes: list[subprocess.Popen] = field(default_factory=list)
    hiccups: list[tuple[float, float, str]] = field(default_factory=list)
    work: list[dict[str, float]] = field(default_factory=list)

    def __enter__(self) -> Probes:
        command = [sys.executable, "-m", "benchmarks.hiccups", "3600"]
        for _ in range(self.count):
            self.processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGINT)  # (KeyboardInterrupt: the probe writes its work times and ends)
        for process in self.processes:
            out, _ = process.communicate(timeout=10)
            self.hiccups += parse(out)
            self.work += parse_work(out)
        self.hiccups.sort()

    def summary(self) -> dict[str, Any]:
        """Hiccups per probe, and pauses of the machine: hiccups of every probe starting within 1 ms of each
        other (a pause's length: the shortest of their sleeps, the 1 ms asked for included)."""
        pauses: list[list[tuple[float, float, str]]] = []
        for hiccup in self.hiccups:
            if pauses and hiccup[0] - pauses[-1][0][0] < 0.001 and hiccup[2] not in {h[2] for h in pauses[-1]}:
                pauses[-1].append(hiccup)
            else:
                pauses.append([hiccup])
        whole = [min(b - a for a, b, _ in group) * 1000 for group in pauses if len(group) == self.count]
        return {
            "probes": self.count,
            "hiccups": len(self.hiccups),
            "machine_pauses": len(whole),
            "machine_pause_max_ms": round(max(whole, default=0.0), 2),
            "machine_pauses_over_5ms": sum(p > 5 for p in whole),
            "machine_pause_total_ms": round(sum(whole), 2),
            # The fixed work's times, per probe: slow stretches of the CPUs without a pause.
            "work_median_us": [w["median_us"] for w in self.work],
            "work_p99_us": [w["p99_us"] for w in self.work],
            "work_max_us": [w["max_us"] for w in self.work],
            "work_over_2x": [int(w["over_2x"]) for w in self.work],
        }


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        probe(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
