"""The busy-polling event loop (codestream/busy_poll.py): it stays awake after I/O for its window, then
sleeps; it sleeps while paused; and it delivers what arrives from other threads and processes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from codestream import busy_poll

WINDOW_US = 40_000


def run_in(loop_factory, coro_fn):
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro_fn())


async def cpu_while_sleeping(seconds: float) -> float:
    """This thread's CPU time over an idle `seconds` of the running loop."""
    started = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - started


async def some_io() -> None:
    """One read that the loop's selector reports ready (what opens a busy-poll window)."""
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    try:
        received = asyncio.ensure_future(loop.sock_recv(reader, 1))
        await asyncio.sleep(0)  # (now it waits on the selector: data that is there at once would skip it)
        writer.send(b"x")
        assert await received == b"x"
    finally:
        reader.close()
        writer.close()


def test_off_is_the_default_loop() -> None:
    assert not isinstance(busy_poll.loop_factory(0)(), busy_poll.BusyPollLoop)


def test_it_polls_for_its_window_after_io_then_sleeps() -> None:
    async def scenario() -> tuple[float, float]:
        await some_io()
        within = await cpu_while_sleeping(0.2)  # the first 40 ms of this, the loop spins
        after = await cpu_while_sleeping(0.2)  # no I/O since: it sleeps
        return within, after

    within, after = run_in(busy_poll.loop_factory(WINDOW_US), scenario)
    # Spinning for 40 ms costs about that much CPU (less when this machine's other processes preempt it).
    assert within > 0.01, f"the loop slept through its window ({within * 1e3:.1f} ms of CPU)"
    assert after < 0.005, f"the loop kept spinning past its window ({after * 1e3:.1f} ms of CPU)"


def test_a_plain_loop_and_a_paused_one_sleep() -> None:
    async def paused() -> float:
        await some_io()
        with busy_poll.paused():
            return await cpu_while_sleeping(0.1)

    async def plain() -> float:
        await some_io()
        return await cpu_while_sleeping(0.1)

    assert run_in(busy_poll.loop_factory(WINDOW_US), paused) < 0.005
    assert run_in(busy_poll.loop_factory(0), plain) < 0.005


@pytest.mark.parametrize("spin_us", [WINDOW_US, 1_000_000])
def test_data_and_calls_from_other_threads_arrive_while_it_spins(spin_us: int) -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        got: list[str] = []
        done = asyncio.Event()

        def from_another_thread() -> None:
            time.sleep(0.02)
            writer.send(b"data")
            time.sleep(0.02)
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=from_another_thread).start()
        await some_io()
        got.append((await asyncio.wait_for(loop.sock_recv(reader, 4), 5)).decode())
        await asyncio.wait_for(done.wait(), 5)
        got.append("called")
        reader.close()
        writer.close()
        return got

    assert run_in(busy_poll.loop_factory(spin_us), scenario) == ["data", "called"]


def test_timers_fire_on_time_while_it_spins() -> None:
    async def scenario() -> float:
        await some_io()
        started = time.monotonic()
        await asyncio.sleep(0.01)  # due inside the 1 s window
        return time.monotonic() - started

    late = run_in(busy_poll.loop_factory(1_000_000), scenario) - 0.01
    assert late < 0.05, f"a 10 ms timer fired {late * 1e3:.0f} ms late"
