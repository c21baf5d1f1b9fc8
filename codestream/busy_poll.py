"""An asyncio event loop that stays awake for a while after it last had work, polling instead of sleeping.

Opt-in (`--busy-poll-us`, gateway and worker), for deployments that trade CPU for time to first token. At
low load every hop of a request's way to its first token finds the next process asleep in epoll_wait, and
waking it costs 50-80 µs per hop on the lent GPU host (`python -m benchmarks.wakeups`: a receiver whose
loop is kept busy gets the same message that much sooner). A loop that polls with a zero timeout for
`spin_s` after its last ready event is awake when the next request comes, at the price of one CPU core
kept busy meanwhile: the idea of Linux's SO_BUSY_POLL, applied to the event loop.

Spinning holds the GIL between polls, and CPython hands it to a waiting thread only after its switch
interval (5 ms): a thread that needs it, like the worker's engine thread mid-step, would stall. So a loop
that waits on such a thread pauses the spinning meanwhile (`paused()`), and sleeps as a plain loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import Iterator


class SpinningSelector(selectors.DefaultSelector):
    def __init__(self, spin_s: float) -> None:
        super().__init__()
        self.spin_s = spin_s
        self.pauses = 0  # > 0: sleep as usual (see the module's note on the GIL)
        self.last_active = time.monotonic()

    def select(self, timeout: float | None = None) -> list:
        if self.pauses or (timeout is not None and timeout <= 0):
            ready = super().select(timeout)
        else:
            now = time.monotonic()
            limit = None if timeout is None else now + timeout
            spin_until = self.last_active + self.spin_s if limit is None else min(limit, self.last_active + self.spin_s)
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
    def __init__(self, spin_us: int) -> None:
        self.spinning = SpinningSelector(spin_us / 1e6)
        super().__init__(self.spinning)


def loop_factory(spin_us: int):
    """For asyncio.Runner / asyncio.run: a busy-polling loop when spin_us > 0, else the default loop."""
    if spin_us <= 0:
        return asyncio.new_event_loop
    return lambda: BusyPollLoop(spin_us)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """While inside, the running loop (if it busy-polls) sleeps in epoll as a plain loop does."""
    loop = asyncio.get_running_loop()
    selector = loop.spinning if isinstance(loop, BusyPollLoop) else None
    if selector is None:
        yield
        return
    selector.pauses += 1
    try:
        yield
    finally:
        selector.pauses -= 1
