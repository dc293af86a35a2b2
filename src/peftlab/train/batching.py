"""Which examples train together: random batches, or length-bucketed batches that waste less on padding.

Every batch is padded to its longest example, so a batch of one long and fifteen short reviews costs
as much as sixteen long ones. Length bucketing draws a random pool of `POOL` batches' worth of
examples, sorts the pool by length and cuts it into batches, then shuffles the order of all batches:
examples of similar length train together, while every epoch still sees a fresh random mix (the
pool is what keeps the order random; sorting the whole data set would feed the shortest examples
first). Both samplers are seeded: the same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

POOL = 50  # batches per sorting pool


class Batches:
    """A batch sampler (lists of example indices) for a DataLoader; reshuffles on every pass."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucketed: bool) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.bucketed = bucketed
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size
        if not self.bucketed:
            yield from (order[i : i + size] for i in range(0, len(order), size))
            return
        batches = []
        for start in range(0, len(order), size * POOL):
            pool = sorted(order[start : start + size * POOL], key=self.lengths.__getitem__)
            batches.extend(pool[i : i + size] for i in range(0, len(pool), size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

