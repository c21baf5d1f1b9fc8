"""Decode steps as CUDA graphs, one per batch size of a ladder, captured at start-up.

A decode step of a 7B model is ~500 small kernel launches whose launch cost (tens of microseconds of
Python and driver work each) would otherwise rival the GPU time of small batches. A graph replays them in
one launch. Graphs have fixed shapes and addresses, so inputs go through static buffers (ids, positions
here; slots, block tables, context lengths in the Triton backend), a batch is padded up to the next
captured size, and the padded rows compute on the null KV block.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from worker.engine.attention_backends import DecodeMetadata, TritonBackend
from worker.engine.step_inputs import CopyFence, StepPlan


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs: padding wastes at most 7 rows past 8."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


ForwardFn = Callable[[torch.Tensor, torch.Tensor, DecodeMetadata], torch.Tensor]
Graphs = dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]  # size -> (graph, the logits it writes)


def capture_ladder(sizes: list[int], step: Callable[[int], torch.Tensor]) -> Graphs:
    """A graph of step(size) for each size: {size: (graph, its logits)}. Largest first, all sharing one
    memory pool (they never run at the same time). Each graph copies its logits into one buffer shared by the
    ladder, so that the graphs' own outputs go back to the pool after capture instead of each holding
    [rows, vocab] float32 for good (about 0.5 GiB per ladder at 7B). That is safe because a step's logits are
    read before the next step replays a graph (a step launched ahead is one whose logits nobody reads
    again: lookahead.py)."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs: Graphs = {}
    logits: torch.Tensor | None = None
    with torch.cuda.stream(stream):
        for size in sorted(sizes, reverse=True):
            # One eager run first: compiles the kernels for this shape and warms the allocator.
            warm = step(size)
            if logits is None:  # the largest size comes first, with the most rows
                logits = torch.empty_like(warm)
            del warm
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                produced = step(size)
                out = logits[: produced.shape[0]]
                out.copy_(produced)
            del produced
            graphs[size] = (graph, out)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs


class DecodeGraphs:
    def __init__(self, backend: TritonBackend, forward: ForwardFn, max_num_seqs: int, device: torch.device) -> None:
        self.backend = backend
        self.forward = forward
        self.sizes = batch_size_ladder(max_num_seqs)
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.host_ids = torch.zeros(max_num_seqs, dtype=torch.long, pin_memory=True)
        self.host_positions = torch.zeros(max_num_seqs, dtype=torch.long, pin_memory=True)
        self._fence = CopyFence(device)
        self.graphs: Graphs = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        def step(size: int) -> torch.Tensor:
            return self.forward(self.input_ids[:size], self.positions[:size], self.backend.decode_metadata(size))

        self.graphs = capture_ladder(self.sizes, step)

    def run(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the smallest graph that fits; returns float32 logits [num_seqs, vocab] (a view).
        input_ids: the ids on the device already (then plan.input_ids are placeholders)."""
        n = plan.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self._fence.wait()
        ids, positions = self.host_ids.numpy(), self.host_positions.numpy()
        ids[:n] = plan.input_ids
        positions[:n] = plan.positions
        ids[n:size] = 0
        positions[n:size] = 0
        self.input_ids[:size].copy_(self.host_ids[:size], non_blocking=True)
        self.positions[:size].copy_(self.host_positions[:size], non_blocking=True)
        self._fence.mark()
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)  # device to device, queued after the copy above
        self.backend.load_decode(plan, size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
