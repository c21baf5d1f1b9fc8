"""The KV block pool: which physical blocks are free, which sequence holds which, and which full blocks can
be reused by a later request with the same prefix.

The cache is split into fixed-size blocks of `block_size` token slots. A sequence's block table maps its
logical blocks (token i lives in logical block i // block_size) to physical blocks, so sequences grow
without reserving their maximum length up front and memory is only wasted in each last block.

Prefix caching: once a block is full, it is registered under a chained hash of its tokens and of all the
tokens before it, so equal hashes mean equal prefixes (the tokens are compared too: a hash collision can
never hand out wrong K/V). A new sequence whose prompt starts with registered blocks takes them (reference
count + 1) and skips their prefill. A block whose last holder lets go stays registered on the free list,
least recently freed first out: it is reused until its slot is needed for something else.

Block 0 is the null block, never handed out: padded rows of a CUDA-graph batch read and write it.
"""

from __future__ import annotations

from collections import OrderedDict

from worker.engine.sequence import Sequence

NULL_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks  # blocks 1..num_blocks; the pool holds num_blocks + 1
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * (num_blocks + 1)
        # Free blocks in the order they were freed: allocation takes the oldest (LRU eviction).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, its tokens)
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # -- allocation --------------------------------------------------------------------------------------

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
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence (finish, abort or preemption)."""
        # Last blocks first onto the free list, so they are evicted before the prefix blocks others share.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def can_fork(self, parent: Sequence) -> bool:
        """Whether a free block is there for a fork's copy of the parent's partly filled last block (if any)."""
        copied = len(parent.block_table) - parent.num_computed_tokens // self.block_size
        return copied <= len(self.free_blocks)

    def fork(self, parent: Sequence, child: Sequence, copy_block) -> None:
        """Give `child` the parent's KV (another sample of the same prompt): its full blocks are shared, the
        last one, if partly filled, is copied (both sequences will write into it)."""
        assert not child.block_table
        if not self.can_fork(parent):
            raise RuntimeError("out of KV blocks")  # (checked before anything is shared: nothing to undo)
        full = parent.num_computed_tokens // self.block_size
        for block in parent.block_table[:full]:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            child.block_table.append(block)
        child.block_hashes = list(parent.block_hashes[:full])
        if full < len(parent.block_table):
            for src in parent.block_table[full:]:
                dst, _ = self.free_blocks.popitem(last=False)
                self._evict(dst)
                self.ref_counts[dst] = 1
                copy_block(src, dst)
                child.block_table.append(dst)
        child.num_computed_tokens = parent.num_computed_tokens

    # -- prefix caching ----------------------------------------------------------------------------------

    def take_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence holding no blocks: take the registered blocks its tokens start with and mark their
        tokens computed. The last token is always left to compute (its logits are needed). Returns the
        number of tokens reused."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block, h in self._cached_prefix(seq):
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """The tokens take_cached_prefix would reuse for this sequence now, taking nothing."""
        return len(self._cached_prefix(seq)) * self.block_size

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block, hash) of the registered blocks the sequence's tokens start with, last token excluded."""
        # A sequence that wants its prompt's logprobs must compute every prompt position itself.
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []
        bs = self.block_size
        found = []
        prev = 0
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((prev, tokens))
            block = self.cached.get(h)
            if block is None or self.block_key[block] != (h, tokens):
                break
            found.append((block, h))
            prev = h
        return found

    def record_prefix_lookup(self, num_tokens: int, reused: int) -> None:
        """Count one admitted sequence's lookup (failed admissions are retried, and not counted twice)."""
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += reused

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that this step filled (called after num_computed_tokens advanced)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((seq.block_hashes[-1] if seq.block_hashes else 0, tokens))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and block not in self.block_key:
                self.cached[h] = block
                self.block_key[block] = (h, tokens)

    def _evict(self, block: int) -> None:
        key = self.block_key.pop(block, None)
        if key is not None and self.cached.get(key[0]) == block:
            del self.cached[key[0]]
