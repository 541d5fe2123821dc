"""The order in which one block's samples are read and yielded: a pure function of the items'
sample counts, the block seed and the buffer size, computed on indices (numpy), never on data.

Reading: the block's items (pieces of shards) are read front to back, as a tar stream must be,
interleaved in proportion to their sizes (the j-th of n samples of an item is read at "time"
(j + 1/2) / n). Yielding: the reads are cut into chunks of `shuffle_buffer` and each chunk is
yielded in a random permutation seeded by (block seed, chunk). With `shuffle` off, items are
read one after the other and yielded as read.

Because the read order is closed-form and a chunk permutation is one numpy call, the samples a
stream has consumed at any offset of a block are known without reading a byte - which is what
makes exact resume cheap, and re-laying out a LAION-sized plan a matter of seconds: a partly
consumed block has consumed whole chunks (a prefix of every item) plus the first outputs of
one chunk.

Trade-off, documented for users: samples mix across the `block_shards` shards of a block and
within windows of `shuffle_buffer` samples, not across the whole data set; the shard order
itself is re-permuted every data pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlockOrder:
    """Read and output order of one block of items with `counts` samples each."""

    def __init__(self, counts: Sequence[int], seed: int, buffer_size: int, shuffle: bool):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.n = int(self.counts.sum())
        self.seed = seed
        self.buffer = max(1, int(buffer_size)) if shuffle else max(1, self.n)
        self.shuffle = shuffle
        items = np.repeat(np.arange(len(self.counts)), self.counts)
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]) if len(self.counts) else np.zeros(0, np.int64)
        ordinals = np.arange(self.n, dtype=np.int64) - np.repeat(starts, self.counts)
        if shuffle and len(self.counts) > 1:
            keys = (ordinals + 0.5) / np.repeat(self.counts, self.counts)
            order = np.argsort(keys, kind="stable")
            items, ordinals = items[order], ordinals[order]
        self.items = items  # read r takes sample ordinals[r] of item items[r]
        self.ordinals = ordinals

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.buffer)

    def chunk_reads(self, chunk: int) -> tuple[int, int]:
        """The read indices [start, end) of `chunk`."""
        return chunk * self.buffer, min((chunk + 1) * self.buffer, self.n)

    def permutation(self, chunk: int) -> np.ndarray:
        """Output position k of `chunk` yields read chunk_start + permutation[k]."""
        start, end = self.chunk_reads(chunk)
        if not self.shuffle:
            return np.arange(end - start)
        return np.random.default_rng([self.seed & 0xFFFFFFFFFFFF, chunk]).permutation(end - start)

    def unconsumed_mask(self, offset: int) -> np.ndarray:
        """Per read: True when its sample is not among the first `offset` samples yielded."""
        mask = np.ones(self.n, dtype=bool)
        chunk, k = divmod(offset, self.buffer)
        mask[: chunk * self.buffer] = False
        if k and chunk < self.num_chunks:
            mask[chunk * self.buffer + self.permutation(chunk)[:k]] = False
        return mask
