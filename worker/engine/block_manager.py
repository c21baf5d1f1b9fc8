"""The KV block pool: which physical blocks are free, and which sequence holds which.

The cache is split into fixed-size blocks of `block_size` token slots. A sequence's block table maps its
logical blocks (token i lives in logical block i // block_size) to physical blocks, so sequences grow
without reserving their maximum length up front and memory is only wasted in each last block.

Blocks carry a reference count so that several sequences can share one (prefix caching, n samples of one
prompt); a block returns to the free list when its last holder releases it.
"""

from __future__ import annotations

from collections import deque

from worker.engine.sequence import Sequence


class BlockManager:
    """Manages blocks 1..num_blocks of a pool of num_blocks + 1: block 0 is the null block, never handed
    out, which padded rows of a CUDA-graph batch read and write."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * (num_blocks + 1)
        self.free_blocks: deque[int] = deque(range(1, num_blocks + 1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that the sequence's cache covers `num_new_tokens` more tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the sequence's block table to hold `num_new_tokens` more tokens (checked by can_allocate)."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self.free_blocks)}")
        for _ in range(needed):
            block = self.free_blocks.popleft()
            assert self.ref_counts[block] == 0, f"block {block} on the free list is still referenced"
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence (finish, abort or preemption)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table.clear()
