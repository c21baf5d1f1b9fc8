"""Keep a host's idle CPUs polling instead of halting: one spinner per CPU at the lowest priority
(`codestream serve --spin-idle-cpus`).

Why: a request's way to its first token wakes a sleeping thread at every hop (client -> gateway, gateway ->
Redis -> worker, worker -> Redis -> gateway -> client). On a virtual machine a vCPU with nothing to run
halts and leaves the guest, and a wake-up on it waits for the hypervisor to resume it. On the lent H100 (a
Firecracker guest without a cpuidle driver) that cost 0.5-1.3 ms of each first token: 2.8-3.6 ms added over
the engine alone, against 1.8-2.7 ms with spinners (docs/BENCHMARKS.md, runs 78-84). The kernel's
`idle=poll` does the same for the whole machine, and cpuidle's haltpoll driver for a while after each halt
where the guest has one; this needs neither root nor a reboot, and ends with the stack.

A spinner runs at SCHED_IDLE, below every normal thread: one that becomes runnable on its CPU takes it at
once, without the CPU ever having left the guest. The cost is every idle CPU kept at 100 %: power, and on a
host with SMT a spinning sibling slows the other thread of its core (the lent machine has one thread per
core). Not for a container with a CPU limit: the spinners would use up its quota and get the real work
throttled. A spinner exits when the process that started it dies, however it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

MODES = ("yield", "spin")
PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def spinning(cpus: list[int] | None = None, mode: str = "yield") -> Iterator[list[subprocess.Popen]]:
    """A spinner on each of `cpus` (default: every CPU this process may use) while the block runs.
    mode "yield": a loop of sched_yield calls; "spin": a loop of bytecode (the two measured alike)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    command = [sys.executable, "-m", "codestream.idle_spin", str(os.getpid()), mode]
    spinners = [subprocess.Popen([*command, str(cpu)]) for cpu in cpus]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def smt_active() -> bool:
    """Whether the CPUs share cores with siblings (then a spinner slows the real work on its sibling)."""
    try:
        return Path("/sys/devices/system/cpu/smt/active").read_text().strip() == "1"
    except OSError:
        return False


def idle_cpus_halt_in_a_vm(
    idle_driver: Path = Path("/sys/devices/system/cpu/cpuidle/current_driver"), cpuinfo: Path = Path("/proc/cpuinfo")
) -> bool:
    """Whether this is a virtual machine (the CPUs' `hypervisor` flag) whose idle CPUs halt with nothing to
    soften it: no cpuidle driver (haltpoll, where the guest has it, polls a while before halting)."""
    try:
        driver = idle_driver.read_text().strip() if idle_driver.exists() else "none"
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return driver == "none" and "hypervisor" in flags.split()


def spin(parent: int, mode: str, cpu: int) -> None:
    """A spinner's life: on `cpu`, at SCHED_IDLE, until `parent` is gone."""
    # Ctrl-C reaches the whole foreground process group: the parent stops its spinners itself, and a dozen
    # KeyboardInterrupt tracebacks would bury its own shutdown log.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # (Linux only; the parent check below still ends it)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # the parent died before the death signal was set up
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    step = os.sched_yield if mode == "yield" else _nothing
    while os.getppid() == parent:
        for _ in range(100_000):
            step()


def _nothing() -> None:
    pass


if __name__ == "__main__":
    spin(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
