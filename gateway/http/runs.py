"""The generations of one HTTP request, opened through `Generations` (the gRPC API's path) and read as one
stream: a request with several prompts (OpenAI's prompt list, /score's input strings) is one generation
per prompt, running concurrently, each with its n samples; choice `i * n + k` is prompt i's sample k.

Closing the run closes every generation, which cancels the jobs not finished: a client that disconnects,
an error in one prompt's generation, or a gateway drain all go through `Generation.close()`, as for gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from gateway.generations import Generation, Generations
from gateway.http.errors import HttpError, from_status
from gateway.prompts import UnsupportedByModel
from gateway.validation import ResolvedRequest
from protos import api


async def open_all(
    generations: Generations, resolved: Sequence[ResolvedRequest], timeout_s: float, tenant: str, traceparent: str
) -> list[Generation]:
    """One generation per resolved request; all or none (a refusal closes, and so cancels, those opened)."""
    opened: list[Generation] = []
    try:
        for request in resolved:
            opened.append(await generations.open(request, timeout_s, tenant, traceparent))
    except BaseException:
        for generation in opened:
            generation.close()
        raise
    return opened


@dataclass
class Update:
    """Something new for one choice: a token chunk or its end."""

    choice: int
    generation: int
    tokens: api.TokenChunk | None = None
    finished: api.Finished | None = None


@dataclass
class Choice:
    parts: list[str] = field(default_factory=list)
    logprobs: list[api.TokenLogprob] = field(default_factory=list)
    finished: api.Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Run:
    def __init__(self, generations: list[Generation], n: int) -> None:
        self.generations = generations
        self.n = n
        self.prompt_tokens = [0] * len(generations)
        self.completion_tokens = 0
        # Per generation: its prompt tokens' log-probabilities (response.prompt_logprobs), from its first chunk.
        self.prompt_logprobs: list[list[api.TokenLogprob]] = [[] for _ in generations]

    @property
    def id(self) -> str:
        return self.generations[0].client_id

    @property
    def choices(self) -> int:
        return len(self.generations) * self.n

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    async def updates(self) -> AsyncIterator[Update]:
        """Every choice's chunks and ends, in arrival order. Raises HttpError when a generation ends in an error
        or past its deadline. Use under `contextlib.aclosing`: closing (or cancelling) it closes the generations."""
        if len(self.generations) == 1:
            # One prompt, the common case: read its events directly, so that token chunks already waiting in its
            # inbox are merged into one (Generation._merge_waiting) for a client that reads slower than they come.
            try:
                async with contextlib.aclosing(self.generations[0].events()) as events:
                    async for event in events:
                        if (update := self._update(0, event)) is not None:
                            yield update
            finally:
                self.close()
            return
        queue: asyncio.Queue[tuple[int, api.GenerateEvent | Exception | None]] = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            # Each generation's events are already bounded by its inbox; the queue only interleaves them.
            try:
                async for event in generation.events():
                    queue.put_nowait((index, event))
            except Exception as exc:  # a Redis failure mid-read: the consumer raises it
                queue.put_nowait((index, exc))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self.generations)]
        running = len(tasks)
        try:
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                elif (update := self._update(index, item)) is not None:
                    yield update
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    def close(self) -> None:
        """Close every generation (idempotent): those not finished have their jobs cancelled."""
        for generation in self.generations:
            generation.close()

    def _update(self, index: int, event: api.GenerateEvent) -> Update | None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            self.prompt_tokens[index] = event.queued.prompt_tokens
            return None
        if kind == "error":
            raise from_status(event.error.code, event.error.message)
        choice = index * self.n + event.index
        if kind == "tokens":
            if event.tokens.prompt_logprobs:
                self.prompt_logprobs[index] = list(event.tokens.prompt_logprobs)
            return Update(choice, index, tokens=event.tokens)
        finished = event.finished
        # As the gRPC API ends these with a non-OK status after the Finished event.
        if finished.stop_reason == api.STOP_REASON_DEADLINE:
            raise HttpError(504, "deadline exceeded")
        if finished.stop_reason == api.STOP_REASON_ERROR:
            raise from_status(grpc.StatusCode.INTERNAL, "the generation failed")
        self.completion_tokens += finished.generated_tokens
        return Update(choice, index, finished=finished)

    async def collect(self) -> list[Choice]:
        """Wait for the end of every choice (a non-streaming answer)."""
        choices = [Choice() for _ in range(self.choices)]
        async with contextlib.aclosing(self.updates()) as updates:
            async for update in updates:
                choice = choices[update.choice]
                if update.tokens is not None:
                    choice.parts.append(update.tokens.text)
                    choice.logprobs.extend(update.tokens.logprobs)
                else:
                    choice.finished = update.finished
        return choices


class Output(Protocol):
    """How one endpoint answers: the whole answer at the end, or (streaming) chunks as updates come."""

    def response(self, run: Run, choices: list[Choice]) -> Any: ...

    def start(self, run: Run) -> list[dict[str, Any]]: ...

    def update(self, run: Run, update: Update) -> list[dict[str, Any]]: ...

    def end(self, run: Run) -> list[dict[str, Any]]: ...


def _unsupported(exc: UnsupportedByModel) -> HttpError:
    return HttpError(400, str(exc), code="model_not_supported")


@dataclass
class Plan:
    """A request converted: one resolver per generation to open (each raises InvalidRequest naming the
    client's field), the samples per generation, and how to answer."""

    resolvers: list[Callable[[], ResolvedRequest]]
    n: int
    output: Output
    stream: bool = False
    # The served model cannot do what the request asks (no chat template, no infilling tokens).
    unsupported: Callable[[UnsupportedByModel], HttpError] = _unsupported
