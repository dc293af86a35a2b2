"""SparseLoRA's sparsity calibrated to a loss budget: a measured profile, then a knapsack.

The profile runs the model in evaluation mode with its sparse modules in training mode (the sparse path runs,
dropout does not) on a few training batches, routed as training routes them (context tokens sparse, supervised
ones dense), first with every block dense, then with one block alone (a layer's FFN or its attention) at each
level. For each it records the relative increase of the loss, the relative error of the output the loss reads
(the last hidden states at supervised positions, or the class logits), and the FLOPs the sparsified projections
saved net of the estimator's own.

The allocation picks at most one level per block so that the FLOPs saved are largest while the summed predicted
increases stay within the budget (a multiple-choice knapsack over the budget cut into `UNITS`). The predicted
increase of a level is the largest loss change, either way, measured at it or any lower level, so that noise
cannot make a sparser level look free. When nothing saves FLOPs within the budget (or the budget is 0), every
block stays dense: the run is LoRA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from peftlab.methods.base import backbone_hidden
from peftlab.methods.sparse_channels import (
    Block,
    Flops,
    NarrowLoraLinear,
    SparseProjection,
    SplitFfn,
)

UNITS = 1000  # the loss budget in knapsack units


@dataclass
class BlockProfile:
    layer: int
    block: str  # "ffn" or "attention"
    increase: list[float]  # relative loss increase at each level
    output_error: list[float]  # relative L2 error of the output the loss reads
    saving: list[float]  # share of the sparsified projections' dense FLOPs saved, net of the estimator

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.block}"


@dataclass
class SparsityProfile:
    levels: list[float]
    base_loss: float
    blocks: list[BlockProfile]
    examples: int
    seconds: float = 0.0
    cached: bool = False  # read from the disk cache (not stored)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "cached"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityProfile:
        return cls(**{**data, "blocks": [BlockProfile(**b) for b in data["blocks"]]})


@dataclass
class Allocation:
    """The chosen level per block (0: dense) and what the profile predicts for it."""

    levels: dict[str, float]  # "layer.block" -> sparsity
    predicted_increase: float  # summed relative loss increases
    saving: float  # summed net FLOP shares saved
    dense: bool  # nothing within the budget saves FLOPs: every block dense
    reason: str = ""
    measured_increase: float | None = None  # the whole allocation's, measured on the profile batches


def block_name(block: Block) -> str:
    return "ffn" if type(block).__name__ == "FfnBlock" else "attention"


def measure_profile(model: nn.Module, blocks: Sequence[Block], batches: list[dict[str, torch.Tensor]], kind: str,
                    levels: Sequence[float], prepare_batch, state) -> SparsityProfile:
    """Each block alone at each level, against every block dense, on `batches` (see the module's docstring).
    `prepare_batch` routes a batch as training does; `state` is the blocks' shared SparseState."""
    start = time.perf_counter()
    saved = {id(b): b.sparsity for b in blocks}
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, the functional kind (attention probabilities) included
    for module in model.modules():  # but the sparse path runs: it runs in training mode only
        if isinstance(module, (SparseProjection, SplitFfn, NarrowLoraLinear)):
            module.training = True
    active, state.active = state.active, True
    try:
        for b in blocks:
            b.sparsity = 0.0
        base = _run(model, batches, kind, prepare_batch, state)
        profiles = []
        for b in blocks:
            increase, error, saving = [], [], []
            for level in levels:
                b.sparsity = level
                run = _run(model, batches, kind, prepare_batch, state)
                increase.append((run.loss - base.loss) / base.loss)
                error.append(_relative_error(run.outputs, base.outputs))
                saving.append((base.flops.executed - run.flops.executed - run.flops.estimator) / base.flops.dense)
            b.sparsity = 0.0
            profiles.append(BlockProfile(b.layer, block_name(b), increase, error, saving))
    finally:
        for b in blocks:
            b.sparsity = saved[id(b)]
        state.active = active
        for module, mode in modes.items():
            module.train(mode)
    examples = sum(len(b["input_ids"]) for b in batches)
    return SparsityProfile(list(levels), base.loss, profiles, examples, time.perf_counter() - start)


@dataclass
class _Pass:
    loss: float
    outputs: list[torch.Tensor]
    flops: Flops


@torch.no_grad()
def _run(model: nn.Module, batches: list[dict[str, torch.Tensor]], kind: str, prepare_batch, state) -> _Pass:
    """Token-weighted loss over `batches`, the outputs the loss reads, and the FLOPs the projections counted."""
    import torch.nn.functional as F

    from peftlab.models.load import unwrap
    from peftlab.tasks.prepare import IGNORE

    total, count, outputs = 0.0, 0, []
    state.flops = Flops()
    for batch in batches:
        prepare_batch(batch)
        if kind == "classification":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            count += len(logits)
            outputs.append(logits)
            continue
        hidden = backbone_hidden(model, batch)
        targets = batch["labels"][:, 1:]
        supervised = targets != IGNORE
        read = hidden[:, :-1][supervised]
        logits = unwrap(model).get_output_embeddings()(read).float()
        cap = getattr(unwrap(model).config, "final_logit_softcapping", None)
        if cap:  # as `train.loss.causal_lm_nll` computes the training loss (methods cannot import train)
            logits = torch.tanh(logits / cap) * cap
        total += F.cross_entropy(logits, targets[supervised], reduction="sum").item()
        count += int(supervised.sum())
        outputs.append(read.float())
    flops, state.flops = state.flops, Flops()
    return _Pass(total / max(count, 1), outputs, flops)


def _relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    difference = sum(float((a - b).pow(2).sum()) for a, b in zip(outputs, reference))
    size = sum(float(b.pow(2).sum()) for b in reference)
    return math.sqrt(difference / size) if size else 0.0


def choose_levels(profile: SparsityProfile | None, loss_budget: float) -> Allocation:
    """The levels with the largest net FLOP saving whose summed predicted increase is within `loss_budget`
    (`profile` None: the budget is 0)."""
    levels = {b.key: 0.0 for b in profile.blocks} if profile is not None else {}
    if loss_budget <= 0 or profile is None:
        return Allocation(levels, 0.0, 0.0, True, "a loss budget of 0 allows no sparsity: every block runs dense (LoRA)")
    options: list[list[tuple[int, float, float, float]]] = []  # per block: (units, increase, saving, level)
    for b in profile.blocks:
        worst, choices = 0.0, []
        for level, increase, saving in zip(profile.levels, b.increase, b.saving):
            # a change either way counts (a loss that fell on a few batches is noise, not a gain), and a sparser
            # level is predicted at least as costly as a denser one
            worst = max(worst, abs(increase))
            units = math.ceil(worst / loss_budget * UNITS - 1e-9)
            if saving > 0 and units <= UNITS:
                choices.append((units, worst, saving, level))
        options.append(choices)
    # best[u]: (saving, ((block, option), ...)) over the blocks so far within u units
    best: list[tuple[float, tuple[tuple[int, int], ...]]] = [(0.0, ())] * (UNITS + 1)
    for i, choices in enumerate(options):
        new = list(best)
        for j, (units, _, saving, _) in enumerate(choices):
            for u in range(units, UNITS + 1):
                candidate = best[u - units][0] + saving
                if candidate > new[u][0] + 1e-12:
                    new[u] = (candidate, best[u - units][1] + ((i, j),))
        best = new
    saving, picked = best[UNITS]
    for i, j in picked:
        levels[profile.blocks[i].key] = options[i][j][3]
    if not picked:
        return Allocation(levels, 0.0, 0.0, True, f"no level of any block saves FLOPs net of the estimator within a "
                                                  f"loss budget of {loss_budget:.2%}: every block runs dense (LoRA)")
    return Allocation(levels, sum(options[i][j][1] for i, j in picked), saving, False)
