"""The paged KV cache's bookkeeping on the host: a free list of blocks and a block table per sequence.

The device side is two pools k, v [L, P, Z, K, H] (jint8.models.init_paged_pool) that the compiled
step reads and writes through the block tables (jint8/ops/attention/paged.py). Block 0 is scratch
(padding writes land there) and is never handed out. Admission reserves a sequence's worst case
(prompt + max_tokens) up front, so a running sequence never waits for a block and nothing needs
preempting; the blocks themselves are taken as its prompt's chunks are written, the rest of the
reservation when it starts decoding (so its block table stays fixed while it decodes), and all go
back to the free list when it ends.
"""

from __future__ import annotations

import math

import numpy as np

from jint8.errors import InvalidConfigError
from jint8.ops.attention.paged import SCRATCH_BLOCK


class BlockAllocator:
    """Blocks 1 .. num_blocks - 1 of the pool, handed out and taken back by sequence id."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_sequence: int):
        if num_blocks < 2:
            raise InvalidConfigError(f"num_blocks={num_blocks} must be >= 2 (block 0 is scratch)")
        if block_size < 1:
            raise InvalidConfigError(f"block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_blocks_per_sequence = max_blocks_per_sequence
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first
        self._owned: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}

    # ------------------------------------------------------------------ admission
    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def unreserved_blocks(self) -> int:
        return self.usable_blocks - sum(self._reserved.values())

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.unreserved_blocks

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Promise seq_id enough blocks for num_tokens positions (its prompt + max_tokens)."""
        needed = self.blocks_for(num_tokens)
        if seq_id in self._reserved:
            raise InvalidConfigError(f"sequence {seq_id} already holds a reservation")
        if needed > self.max_blocks_per_sequence or needed > self.unreserved_blocks:
            raise InvalidConfigError(f"sequence {seq_id}: {num_tokens} tokens need {needed} blocks, "
                                     f"{self.unreserved_blocks} unreserved of {self.usable_blocks}")
        self._reserved[seq_id] = needed
        self._owned[seq_id] = []

    # ------------------------------------------------------------------ blocks
    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Hand seq_id blocks until its table covers positions 0 .. num_tokens - 1; its table."""
        owned = self._owned[seq_id]
        needed = self.blocks_for(num_tokens)
        if needed > self._reserved[seq_id]:
            raise InvalidConfigError(f"sequence {seq_id}: {num_tokens} tokens exceed its reservation "
                                     f"of {self._reserved[seq_id]} blocks")
        while len(owned) < needed:
            owned.append(self._free.pop())  # never empty: reservations never exceed the pool
        return owned

    def free(self, seq_id: int) -> None:
        """Give back every block of seq_id and its reservation (a no-op for an unknown id)."""
        self._free.extend(reversed(self._owned.pop(seq_id, [])))
        self._reserved.pop(seq_id, None)

    def table(self, seq_id: int) -> np.ndarray:
        """seq_id's block table padded with the scratch block to max_blocks_per_sequence: [M] int32."""
        row = np.full(self.max_blocks_per_sequence, SCRATCH_BLOCK, np.int32)
        owned = self._owned[seq_id]
        row[: len(owned)] = owned
        return row

    # ------------------------------------------------------------------ accounting
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return sum(len(b) for b in self._owned.values())

    @property
    def sequences(self) -> tuple[int, ...]:
        return tuple(self._owned)

    def owned(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._owned[seq_id])
