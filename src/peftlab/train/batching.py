"""Which examples train together: random batches, or length-bucketed batches that waste less on padding.

Every batch is padded to its longest example, so a batch of one long and fifteen short reviews costs
as much as sixteen long ones. Length bucketing draws a random pool of `POOL` batches' worth of
examples, sorts the pool by length and cuts it into batches, then shuffles the order of all batches:
examples of similar length train together, while every epoch still sees a fresh random mix (the
pool is what keeps the order random; sorting the whole data set would feed the shortest examples
first). Both samplers are seeded: the same seed gives the same batches.

Packed batches (`train.batching: packed`) are the random batches, each concatenated into one row without
padding (`tasks.prepare.collate_packed`): the model must build its attention mask from position ids, which
transformers does for the families in PACKABLE when it is called without a mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

POOL = 50  # batches per sorting pool
PACKABLE = ("gpt2", "llama", "phi3")  # architecture families whose attention reads packed rows (masking_utils)


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



def check_packable(model_type: str, processes: int) -> None:
    """One line where a packed row would not be read as separate examples: a family whose attention may not build
    its mask from position ids, or a run over several processes (one row cannot be shared out)."""
    from peftlab.errors import PeftlabError
    from peftlab.models.architectures import family_for

    family = family_for(model_type)
    if family is None or family.name not in PACKABLE:
        raise PeftlabError(f"train.batching: packed: {model_type} models are not known to confine attention to each "
                           f"packed example; packed runs on the {', '.join(PACKABLE)} families (use bucketed or random)")
    if processes > 1:
        raise PeftlabError(f"train.batching: packed runs in one process ({processes} here): a packed row cannot be "
                           "shared out between processes; use bucketed or random")
