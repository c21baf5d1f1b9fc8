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


def test_a_held_loop_polls_for_its_hold_window_and_sleeps_once_released() -> None:
    async def scenario() -> tuple[float, float, float]:
        await some_io()
        unheld = await cpu_while_sleeping(0.1)  # no plain window (spin 0): it sleeps
        release = busy_poll.hold()
        await some_io()
        held = await cpu_while_sleeping(0.2)  # the first 40 ms of this, the loop spins
        release()
        release()  # (a second release does not take another hold's)
        await some_io()
        released = await cpu_while_sleeping(0.1)
        return unheld, held, released

    unheld, held, released = run_in(busy_poll.loop_factory(0, WINDOW_US), scenario)
    assert unheld < 0.005, f"an unheld loop spun ({unheld * 1e3:.1f} ms of CPU)"
    assert held > 0.01, f"a held loop slept through its hold window ({held * 1e3:.1f} ms of CPU)"
    assert released < 0.005, f"the loop kept spinning once released ({released * 1e3:.1f} ms of CPU)"


def test_hold_does_nothing_on_a_plain_loop_or_outside_one() -> None:
    async def scenario() -> float:
        release = busy_poll.hold()
        await some_io()
        spent = await cpu_while_sleeping(0.1)
        release()
        return spent

    assert run_in(busy_poll.loop_factory(0, 0), scenario) < 0.005
    busy_poll.hold()()  # no running loop: a no-op, not an error


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


def test_a_request_keeps_the_gateway_polling_until_its_first_token(redis_url: str, demo_model_dir) -> None:
    """The gateway's --first-token-poll-us: a request holds its loop awake from admission to its first
    token, and lets go then, or when it ends without one (here: its client leaves while it waits)."""
    from protos import api
    from tests.conftest import running_stack, start_worker

    def request(n: int) -> api.GenerateRequest:
        return api.GenerateRequest(prompt="def f(x):", stopping=api.StoppingCriteria(max_new_tokens=n, ignore_eos=True))

    async def scenario() -> None:
        selector = asyncio.get_running_loop().spinning
        async with running_stack(redis_url, demo_model_dir, start_worker=False) as stack:
            waiting = stack.stub.GenerateStream(request(4))
            assert (await waiting.read()).HasField("queued")
            assert selector.holds == 1, "no worker yet: the request waits for its first token"
            waiting.cancel()
            for _ in range(200):
                if selector.holds == 0:
                    break
                await asyncio.sleep(0.01)
            assert selector.holds == 0, "a request that left before its first token still holds the loop"

            worker = start_worker(redis_url, demo_model_dir, stack.namespace)
            try:
                call = stack.stub.GenerateStream(request(200))
                event = await call.read()
                while not event.HasField("tokens"):
                    event = await call.read()
                # (released before the token was sent on; the stream itself goes on for 199 more tokens)
                assert selector.holds == 0, "the request still holds the loop after its first token"
                call.cancel()
            finally:
                worker.stop.set()
                await asyncio.wait_for(worker.task, timeout=30)
                await worker.worker.redis.aclose()

    with asyncio.Runner(loop_factory=busy_poll.loop_factory(0, WINDOW_US)) as runner:
        runner.run(scenario())
