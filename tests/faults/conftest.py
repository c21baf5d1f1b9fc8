"""Fault injection with real processes: a Redis-protocol server, `codestream worker` and `codestream gateway`
subprocesses, killed, paused, signalled and restarted for real.

Every test gets a `cluster`: its own Redis server (on a port that survives a restart), its own namespace, and
helpers to start workers and gateways as `python -m codestream.cli ...` with `CODESTREAM_*` settings. Each
process logs JSON lines to a file under the test's tmp_path; a failing test prints the tail of every log.
Every process is killed when the test ends, whatever happened.

Each test reports its figures with the `figure` fixture (printed, kept as a JUnit property, and listed in
the terminal summary at the end of the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from codestream.redis_server import EmbeddedRedis, free_port
from protos import api, api_grpc
from protos.keys import EVENT_FIELD, Keys
from worker.engine import EngineConfig, LLMEngine, SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Settings every worker of this suite runs with, unless a test overrides them: short leases so that reclaim
# happens within about a second, a small KV pool (the CPU sandbox has little memory to spare).
WORKER_DEFAULTS: dict[str, object] = {
    "device": "cpu",
    "lease_s": 1.0,
    "heartbeat_s": 0.2,
    "num_blocks": 2048,
    "shutdown_grace_s": 10,
    "metrics_port": 0,  # several workers share this host
}
GATEWAY_DEFAULTS: dict[str, object] = {
    "host": "127.0.0.1",
    "shutdown_grace_s": 2,
    "deadline_grace_s": 0.5,
    "outage_bound_s": 3,
    "metrics_port": 0,
}
# One torch thread per worker: on 2 shared cores, two threads per process spin against each other (a step of
# the demo model is several times slower with 2 threads than with 1 once other processes are busy).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The worker's intake blocks this long in XREADGROUP (worker/service.py): a worker paused for longer than
# this holds no blocked read on the server, so new jobs go to the other workers.
INTAKE_BLOCK_S = 1.0

REFERENCE_TOKENS = 300  # the longest generation any test compares

FIGURES: list[tuple[str, str]] = []


# -- processes -----------------------------------------------------------------------------------------------


@dataclass
class Process:
    """A `codestream` subprocess and its log (JSON lines on stderr, captured to a file)."""

    name: str
    role: str  # "worker" or "gateway"
    popen: subprocess.Popen
    log_path: Path
    port: int = 0  # gateways: the gRPC port

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The process's structured log lines so far (optionally only those of one event)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue  # progress bars and other non-JSON output
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if name is None or record.get("event") == name:
                    out.append(record)
        return out

    async def wait_event(
        self, name: str, timeout_s: float = 60, where: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.events(name) if where(e)]
            if found:
                return found[0]
            if not self.alive:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before logging {name!r}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} did not log {name!r} within {timeout_s} s")

    def counts(self) -> dict[str, int]:
        """The worker's lifetime counts, from its `worker_stopped` line (after a graceful stop)."""
        stopped = self.events("worker_stopped")
        assert stopped, f"{self.name} logged no worker_stopped line"
        return stopped[-1]["counts"]

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    async def wait_exit(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.alive:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running {timeout_s} s later")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def rss_mib(self) -> float:
        """Resident memory of the process now (VmRSS), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def env_for(settings: dict[str, object]) -> dict[str, str]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[f"CODESTREAM_{key.upper()}"] = str(value)
    return out


class Cluster:
    """One test's Redis server, namespace, processes and client channels."""

    def __init__(self, tmp_path: Path, model_dir: Path, redis_server: EmbeddedRedis) -> None:
        self.tmp_path = tmp_path
        self.model_dir = model_dir
        self.redis_server = redis_server
        self.namespace = f"f{uuid.uuid4().hex[:10]}"
        self.keys = Keys(self.namespace)
        self.processes: list[Process] = []
        self._channels: list[grpc.aio.Channel] = []
        self._admin: aioredis.Redis | None = None

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    # -- starting processes --------------------------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        role: str,
        args: list[str],
        settings: dict[str, object],
        extra_env: dict[str, str] | None = None,
    ) -> Process:
        env = {
            **os.environ,
            **(extra_env or {}),
            "PYTHONUNBUFFERED": "1",
            "CODESTREAM_LOG_FORMAT": "json",
            "CODESTREAM_LOG_LEVEL": "INFO",
            "CODESTREAM_REDIS_URL": self.redis_url,
            "CODESTREAM_NAMESPACE": self.namespace,
            "CODESTREAM_MODEL": str(self.model_dir),
            **env_for(settings),
        }
        log_path = self.tmp_path / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [PYTHON, "-m", "codestream.cli", role, *args],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a signal for the test runner's group never reaches it
            )
        process = Process(name, role, popen, log_path, port=int(settings.get("port", 0) or 0))
        self.processes.append(process)
        return process

    def start_worker(self, name: str, **settings: object) -> Process:
        """A worker process named `name` (also its consumer name in the jobs group)."""
        return self._spawn(name, "worker", [], {**WORKER_DEFAULTS, "worker_id": name, **settings}, WORKER_ENV)

    def start_gateway(self, name: str, **settings: object) -> Process:
        return self._spawn(name, "gateway", [], {**GATEWAY_DEFAULTS, "port": free_port(), **settings})

    async def ready(self, *processes: Process, timeout_s: float = 90) -> None:
        """Wait until every process serves: a worker has logged `worker_ready`, a gateway answers SERVING."""
        await asyncio.gather(*(self._ready(p, timeout_s) for p in processes))

    async def _ready(self, process: Process, timeout_s: float) -> None:
        if process.role == "worker":
            await process.wait_event("worker_ready", timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not process.alive:
                    raise AssertionError(f"{process.name} exited ({process.popen.returncode}) at start-up")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{process.name} not SERVING within {timeout_s} s")

    # -- clients -------------------------------------------------------------------------------------------

    def stub(self, gateway: Process) -> api_grpc.CodeStreamStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        self._channels.append(channel)
        return api_grpc.CodeStreamStub(channel)

    @property
    def admin(self) -> aioredis.Redis:
        """A Redis client for looking at what the processes wrote (event logs, heartbeats, dead letters)."""
        if self._admin is None:
            self._admin = aioredis.Redis.from_url(self.redis_url)
        return self._admin

    async def heartbeat(self, worker: Process) -> dict[str, Any] | None:
        raw = await self.admin.get(self.keys.worker(worker.name))
        return json.loads(raw) if raw else None

    async def wait_heartbeat(
        self, worker: Process, where: Callable[[dict[str, Any]], bool] = lambda _: True, timeout_s: float = 5
    ) -> dict[str, Any]:
        """The worker's first heartbeat (liveness key) that satisfies `where`; fails after `timeout_s`."""
        deadline, beat = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            beat = await self.heartbeat(worker)
            if beat and where(beat):
                return beat
            await asyncio.sleep(0.02)
        raise AssertionError(f"{worker.name}: no such heartbeat within {timeout_s} s (last: {beat})")

    async def event_log(self, request_id: str) -> list[api.GenerateEvent]:
        entries = await self.admin.xrange(self.keys.event_log(request_id))
        return [api.GenerateEvent.FromString(fields[EVENT_FIELD]) for _id, fields in entries]

    @contextlib.asynccontextmanager
    async def intake_paused(self, *workers: Process) -> AsyncIterator[None]:
        """Keep these workers from taking new jobs for a while (SIGSTOP past their blocking read), so that
        jobs enqueued meanwhile all go to the other workers; SIGCONT them on the way out."""
        for worker in workers:
            worker.send(signal.SIGSTOP)
        try:
            await asyncio.sleep(INTAKE_BLOCK_S + 0.3)
            yield
        finally:
            for worker in workers:
                worker.send(signal.SIGCONT)

    async def close(self) -> None:
        for process in self.processes:
            process.send(signal.SIGCONT)
            process.kill()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=10)
        for channel in self._channels:
            await channel.close()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.aclose()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A Redis-protocol server of this test's own, on a fixed port so that it can be restarted in place."""
    server = EmbeddedRedis(port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, demo_model_dir: Path, redis_server: EmbeddedRedis
) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, demo_model_dir, redis_server)
    try:
        yield cluster
    finally:
        await cluster.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for process in cluster.processes:
                print(f"\n----- {process.name} (pid {process.pid}, exit {process.popen.returncode}) -----")
                print(process.tail())


# -- figures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def figure(request: pytest.FixtureRequest, record_property: Callable[[str, object], None]) -> Callable[..., None]:
    """figure("recovery", 2.31, "s"): print it, keep it as a JUnit property, list it in the summary."""

    def report(name: str, value: float | int | str, unit: str = "") -> None:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        line = f"{name} {text}{(' ' + unit) if unit else ''}"
        print(f"[figure] {request.node.name}: {line}")
        record_property(name, f"{text}{(' ' + unit) if unit else ''}")
        FIGURES.append((request.node.name, line))

    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures (2-core CPU sandbox, demo model)")
        for test, line in FIGURES:
            terminalreporter.write_line(f"{test}: {line}")


# -- requests and streams --------------------------------------------------------------------------------------

PROMPTS = [
    f"{head}\n"
    for head in (
        "def parse(path):",
        "import json\nclass Config:",
        "for i in range(10):",
        "x = [1, 2, 3]",
        "def fibonacci(n):",
        "class Stack:\n    def push(self, item):",
        "with open('data.csv') as f:",
        "async def fetch(url):",
        "def quicksort(items):",
        "import os\nfor root, dirs, files in os.walk('.'):",
        "def is_prime(n):",
        "try:\n    value = int(text)",
        "def merge(a, b):",
        "from dataclasses import dataclass\n@dataclass\nclass Point:",
        "def read_lines(path):",
        "while queue:",
        "def flatten(nested):",
        "if __name__ == '__main__':",
        "def count_words(text):",
        "lambda_map = {",
    )
]


def generate_request(prompt: str, max_new_tokens: int, request_id: str = "") -> api.GenerateRequest:
    """Greedy, fixed length (EOS ignored), token ids returned: comparable with the reference run."""
    return api.GenerateRequest(
        prompt=prompt,
        request_id=request_id,
        stopping=api.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
        response=api.ResponseOptions(return_token_ids=True),
    )


@dataclass
class Stream:
    """What one client saw of one call: the events with their arrival times, and how the call ended."""

    events: list[api.GenerateEvent] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each event
    started: float = 0.0
    ended: float = 0.0
    code: grpc.StatusCode | None = None  # None while running
    details: str = ""
    trailers: dict[str, str] = field(default_factory=dict)  # the trailing metadata of an RPC error

    @property
    def request_id(self) -> str:
        return self.events[0].request_id if self.events else ""

    @property
    def chunks(self) -> list[api.GenerateEvent]:
        return [e for e in self.events if e.HasField("tokens")]

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def arrival_of_first(self, predicate: Callable[[api.GenerateEvent], bool]) -> float | None:
        return next((t for e, t in zip(self.events, self.arrivals, strict=True) if predicate(e)), None)


async def consume(call: Any, stream: Stream) -> Stream:
    """Read a streaming call to its end into `stream` (an RPC error is recorded, not raised)."""
    stream.started = stream.started or time.monotonic()
    try:
        async for event in call:
            stream.events.append(event)
            stream.arrivals.append(time.monotonic())
        stream.code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        stream.code, stream.details = exc.code(), exc.details() or ""
        stream.trailers = {k: v for k, v in exc.trailing_metadata() or () if isinstance(v, str)}
    except asyncio.CancelledError:
        stream.code = grpc.StatusCode.CANCELLED
    stream.ended = time.monotonic()
    return stream


def open_stream(
    stub: api_grpc.CodeStreamStub,
    request: api.GenerateRequest,
    timeout_s: float = 60,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> tuple[Stream, asyncio.Task[Stream], Any]:
    """Start a GenerateStream call; returns the live Stream record, the task reading it, and the call."""
    stream = Stream(started=time.monotonic())
    call = stub.GenerateStream(request, timeout=timeout_s, metadata=metadata)
    return stream, asyncio.create_task(consume(call, stream)), call


def token_ids(events: list[api.GenerateEvent]) -> list[int]:
    return [t for e in events if e.HasField("tokens") for t in e.tokens.token_ids]


def covered_seqs(event: api.GenerateEvent) -> range:
    """The worker's seqs one event stands for: its own, or first_seq..seq when the gateway merged token chunks
    that were waiting for a slow reader (a GenerateEvent without the first_seq field covers just its seq)."""
    first = getattr(event, "first_seq", 0)
    return range(first or event.seq, event.seq + 1)


def seqs(events: list[api.GenerateEvent]) -> list[int]:
    """Every seq the events cover, in order."""
    return [s for event in events for s in covered_seqs(event)]


def assert_exactly_once(events: list[api.GenerateEvent], expected: list[int], label: str = "") -> None:
    """Queued (seq 0), then events covering seq 1, 2, ... with no gap or repeat, ending with Finished; the
    tokens are the uninterrupted run's, none missing and none twice."""
    assert events and events[0].HasField("queued"), f"{label}: does not start with Queued"
    covered = seqs(events[1:])
    assert covered == list(range(1, len(covered) + 1)), f"{label}: seqs not contiguous from 1: {covered}"
    assert events[-1].HasField("finished"), f"{label}: ends with {events[-1]}"
    got = token_ids(events)
    assert got == expected, f"{label}: {len(got)} tokens, first difference at {first_difference(got, expected)}"


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


# -- the uninterrupted run ----------------------------------------------------------------------------------


class Reference:
    """Greedy tokens of the demo model without faults: the engine in this process, on CPU, one thread, as the
    workers run it (deterministic). Every prompt of PROMPTS is run once, for REFERENCE_TOKENS tokens, in one
    batch; a request for n tokens gets the first n (greedy, EOS ignored: a prefix of the longer run)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._engine: LLMEngine | None = None
        self._cache: dict[str, list[int]] = {}

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            self._engine = LLMEngine(EngineConfig(model=str(self.model_dir), device="cpu", num_blocks=2048))
        return self._engine

    def tokens(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        todo = [p for p in dict.fromkeys([*PROMPTS, *prompts]) if len(self._cache.get(p, ())) < max_new_tokens]
        if todo:
            self._run(todo, max(max_new_tokens, REFERENCE_TOKENS))
        return [self._cache[p][:max_new_tokens] for p in prompts]

    def tokens_of(self, prompt: str, max_new_tokens: int) -> list[int]:
        """One prompt's tokens, run alone: for a generation longer than the shared batch's."""
        if len(self._cache.get(prompt, ())) < max_new_tokens:
            self._run([prompt], max_new_tokens)
        return self._cache[prompt][:max_new_tokens]

    def _run(self, prompts: list[str], max_new_tokens: int) -> None:
        engine = self.engine
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"ref-{i}", engine.tokenizer.encode(prompt).ids, params)
        out: dict[str, list[int]] = {f"ref-{i}": [] for i in range(len(prompts))}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while engine.has_unfinished():
                for o in engine.step():
                    out[o.request_id] += o.new_token_ids
        finally:
            torch.set_num_threads(threads)
        for i, prompt in enumerate(prompts):
            self._cache[prompt] = out[f"ref-{i}"]


@pytest.fixture(scope="session")
def reference(demo_model_dir: Path) -> Reference:
    return Reference(demo_model_dir)
