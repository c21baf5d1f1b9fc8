"""Helpers of the end-to-end tests: prompts, collecting a stream, checking its shape."""

from __future__ import annotations

import random

from codestream.client import seqs
from protos import api

LINES = [
    "def parse(path):",
    "import json",
    "    for key, value in sorted(items.items()):",
    "class Node:\n    def __init__(self, left, right):",
    "        raise ValueError(f'bad {name!r}')",
    "return [x * 2 for x in range(n) if x % 3]",
    "# Develop a Python function to sort a list of integers in ascending order",
    "while queue:\n    node = queue.pop()",
]


def make_prompts(n: int, seed: int = 7) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        body = "\n".join(rng.choice(LINES) for _ in range(rng.randint(1, 6)))
        prompts.append((f"# request {i}\n{body}\n", rng.randint(4, 40)))
    return prompts


async def collect(stub, request: api.GenerateRequest, **kwargs) -> list[api.GenerateEvent]:
    return [event async for event in stub.GenerateStream(request, **kwargs)]


def greedy_request(prompt: str, max_new_tokens: int, request_id: str = "", **stopping) -> api.GenerateRequest:
    return api.GenerateRequest(
        prompt=prompt,
        request_id=request_id,
        stopping=api.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping),
        response=api.ResponseOptions(return_token_ids=True),
    )


def check_stream_shape(events: list[api.GenerateEvent]) -> tuple[list[int], str, api.Finished]:
    """Queued (seq 0), token chunks and one Finished, seq contiguous from 1; returns ids, text, finished."""
    assert events[0].HasField("queued") and events[0].seq == 0
    assert events[-1].HasField("finished")
    assert seqs(events) == list(range(events[-1].seq + 1)), "seqs must cover 0, 1, 2... with no gap"
    assert all(e.HasField("tokens") for e in events[1:-1])
    assert len({e.request_id for e in events}) == 1
    ids = [t for e in events[1:-1] for t in e.tokens.token_ids]
    return ids, "".join(e.tokens.text for e in events[1:-1]), events[-1].finished
