"""Idle-CPU spinners (codestream/idle_spin.py): one per CPU, at SCHED_IDLE, gone with the block that
started them, and gone when the process that started them dies without cleaning up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codestream import idle_spin


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("mode", idle_spin.MODES)
def test_a_spinner_per_cpu_at_the_lowest_priority_while_the_block_runs(mode: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    with idle_spin.spinning(mode=mode) as spinners:
        assert len(spinners) == len(cpus)
        # (each sets its own CPU and class first thing: wait for that)
        for spinner, cpu in zip(spinners, cpus, strict=True):
            assert wait_until(lambda s=spinner: os.sched_getscheduler(s.pid) == os.SCHED_IDLE)
            assert os.sched_getaffinity(spinner.pid) == {cpu}
            spinner.send_signal(signal.SIGINT)  # (Ctrl-C in a terminal: the parent stops them, not the signal)
        time.sleep(0.2)
        assert all(spinner.poll() is None for spinner in spinners)
    assert all(spinner.poll() is not None for spinner in spinners)


def test_a_spinner_dies_with_the_process_that_started_it() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "from codestream import idle_spin; import time\n"
         "with idle_spin.spinning([min(__import__('os').sched_getaffinity(0))]) as s:\n"
         "    print(s[0].pid, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        spinner = int(parent.stdout.readline())
        assert wait_until(lambda: running(spinner) and os.sched_getscheduler(spinner) == os.SCHED_IDLE)
    finally:
        parent.send_signal(signal.SIGKILL)  # no `finally` of its own runs
        parent.wait()
    assert wait_until(lambda: not running(spinner)), "the spinner outlived its parent"


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"), idle_spin.spinning(mode="hlt"):
        pass


@pytest.mark.parametrize(
    ("driver", "flags", "halting"),
    [
        ("none", "fpu sse2 hypervisor avx2", True),  # the lent H100's guests
        (None, "fpu hypervisor", True),  # no cpuidle directory at all
        ("haltpoll", "fpu hypervisor", False),  # polls a while before it halts
        ("none", "fpu sse2 avx2", False),  # bare metal
    ],
)
def test_which_hosts_get_the_hint_to_spin(tmp_path: Path, driver: str | None, flags: str, halting: bool) -> None:
    idle_driver = tmp_path / "current_driver"
    if driver is not None:
        idle_driver.write_text(driver + "\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert idle_spin.idle_cpus_halt_in_a_vm(idle_driver, cpuinfo) is halting
