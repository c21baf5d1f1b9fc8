"""An asyncio event loop that stays awake for a while after it last had work, polling instead of sleeping.

Opt-in (`--busy-poll-us`, gateway and worker), for deployments that trade CPU for time to first token. At
low load every hop of a request's way to its first token finds the next process asleep in epoll_wait, and
waking it costs 50-80 µs per hop on the lent GPU host (`python -m benchmarks.wakeups`: a receiver whose
loop is kept busy gets the same message that much sooner). A loop that polls with a zero timeout for
`spin_s` after its last ready event is awake when the next request comes, at the price of one CPU core
kept busy meanwhile: the idea of Linux's SO_BUSY_POLL, applied to the event loop.

A narrower mode polls only while a request waits for its first token (`hold()`, the gateway's
`--first-token-poll-us`): from its admission until its first token is relayed, the loop polls for up to
that long after its last I/O. The admission's reply and the first token's message then find the gateway
awake, and an idle gateway, or one whose streams are all past their first token, sleeps as usual.

Spinning holds the GIL between polls, and CPython hands it to a waiting thread only after its switch
interval (5 ms): a thread that needs it, like the worker's engine thread mid-step, would stall. So a loop
that waits on such a thread pauses the spinning meanwhile (`paused()`), and sleeps as a plain loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import Callable, Iterator


class SpinningSelector(selectors.DefaultSelector):
    def __init__(self, spin_s: float, hold_spin_s: float = 0.0) -> None:
        super().__init__()
        self.spin_s = spin_s
        self.hold_spin_s = hold_spin_s  # the window while something holds the loop awake (hold())
        self.holds = 0
        self.pauses = 0  # > 0: sleep as usual (see the module's note on the GIL)
        self.last_active = time.monotonic()

    def select(self, timeout: float | None = None) -> list:
        if self.pauses or (timeout is not None and timeout <= 0):
            ready = super().select(timeout)
        else:
            now = time.monotonic()
            limit = None if timeout is None else now + timeout
            window = max(self.spin_s, self.hold_spin_s) if self.holds else self.spin_s
            spin_until = self.last_active + window if limit is None else min(limit, self.last_active + window)
            ready = []
            while now < spin_until:
                ready = super().select(0)
                if ready:
                    break
                now = time.monotonic()
            if not ready and (limit is None or now < limit):
                ready = super().select(None if limit is None else limit - now)
        if ready:
            self.last_active = time.monotonic()
        return ready


class BusyPollLoop(asyncio.SelectorEventLoop):
    def __init__(self, spin_us: int, hold_spin_us: int = 0) -> None:
        self.spinning = SpinningSelector(spin_us / 1e6, hold_spin_us / 1e6)
        super().__init__(self.spinning)


def loop_factory(spin_us: int, hold_spin_us: int = 0):
    """For asyncio.Runner / asyncio.run: a busy-polling loop when either window is > 0 (spin_us: always;
    hold_spin_us: while held, see hold()), else the default loop."""
    if spin_us <= 0 and hold_spin_us <= 0:
        return asyncio.new_event_loop
    return lambda: BusyPollLoop(max(spin_us, 0), max(hold_spin_us, 0))


def _running_selector() -> SpinningSelector | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # (no loop runs: nothing to keep awake)
        return None
    return loop.spinning if isinstance(loop, BusyPollLoop) else None


def hold() -> Callable[[], None]:
    """Keep the running loop polling (its hold window after its last I/O) until the returned function is
    called; calling it again does nothing. On a loop that does not busy-poll, nothing happens."""
    selector = _running_selector()
    if selector is None:
        return _nothing
    selector.holds += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            selector.holds -= 1

    return release


def _nothing() -> None:
    pass


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """While inside, the running loop (if it busy-polls) sleeps in epoll as a plain loop does."""
    selector = _running_selector()
    if selector is None:
        yield
        return
    selector.pauses += 1
    try:
        yield
    finally:
        selector.pauses -= 1
