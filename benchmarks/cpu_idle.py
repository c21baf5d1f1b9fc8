"""How this machine's idle CPUs sleep, and a way to keep them from sleeping deeply while a benchmark runs.

A diagnostic for issue 7's hop. Every process hop on a request's way wakes a sleeping thread, and on a
virtual machine a vCPU that went idle through HLT leaves the guest: waking it costs a round through the
hypervisor (run 26 measured 50-80 us per hop on the lent H100). The guest kernel's PM QoS interface
(/dev/cpu_dma_latency, the one `tuned`'s latency-performance profile uses) asks cpuidle for states whose
exit latency is at most the given number of microseconds; 0 leaves only polling. That is a host setting,
not the service's: this module only describes the machine and holds the request for a measurement.

    python -m benchmarks.cpu_idle                      # describe the idle driver, its states, the request
    python -m benchmarks.cpu_idle --hold 0             # hold a 0 us request until killed

Where the guest has no cpuidle driver (the lent H100's), the request changes nothing: its idle CPUs halt
whatever it says. codestream/idle_spin.py keeps them from halting another way (`codestream serve
--spin-idle-cpus`; the serving benchmark's CODESTREAM_BENCH_SPIN_IDLE).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")
CPU0_STATES = Path("/sys/devices/system/cpu/cpu0/cpuidle")
PM_QOS = "/dev/cpu_dma_latency"


def read_value(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def idle_states() -> list[dict]:
    """cpu0's idle states: name, exit latency (us), entries and time spent (us) so far."""
    states = []
    for state in sorted(CPU0_STATES.glob("state*")):
        states.append(
            {
                "name": read_value(state / "name"),
                "latency_us": read_value(state / "latency"),
                "usage": int(read_value(state / "usage") or 0),
                "time_us": int(read_value(state / "time") or 0),
                "disabled": read_value(state / "disable"),
            }
        )
    return states


def current_request_us() -> int | None:
    """The PM QoS latency request in force (the device reads back as a native int32), if readable."""
    try:
        with open(PM_QOS, "rb") as device:
            return struct.unpack("i", device.read(4))[0]
    except OSError:
        return None


def describe() -> dict:
    """What decides how deeply this machine's idle CPUs sleep."""
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "idle_driver": read_value(CPUIDLE / "current_driver"),
        "idle_governor": read_value(CPUIDLE / "current_governor") or read_value(CPUIDLE / "current_governor_ro"),
        "cmdline": read_value(Path("/proc/cmdline")),
        "haltpoll_ns": read_value(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")),
        "pm_qos_device": os.path.exists(PM_QOS),
        "pm_qos_request_us": current_request_us(),
        "states": idle_states(),
    }


@contextlib.contextmanager
def hold(latency_us: int) -> Iterator[bool]:
    """Ask for idle states no deeper than `latency_us` for as long as the block runs (the kernel drops the
    request when the file is closed). Yields False where the device is missing or refused."""
    try:
        fd = os.open(PM_QOS, os.O_WRONLY)
    except OSError:
        yield False
        return
    try:
        os.write(fd, struct.pack("i", latency_us))
        yield True
    finally:
        os.close(fd)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold", type=int, default=None, help="hold this latency request (us) until killed")
    args = parser.parse_args()
    info = describe()
    for key, value in info.items():
        if key != "states":
            print(f"{key}: {value}")
    for state in info["states"]:
        print(f"  state {state}")
    if args.hold is None:
        return
    signal.signal(signal.SIGTERM, _interrupt)
    with hold(args.hold) as held:
        print(f"holding {args.hold} us: {held}; request now {current_request_us()}", flush=True)
        if held:
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()


if __name__ == "__main__":
    main()
