"""SparseLoRA's sparsity calibrated to a loss budget: a measured profile, then a knapsack.

The profile runs the model in evaluation mode with its sparse modules in training mode (the sparse path runs,
dropout does not) on a few training batches, routed as training routes them (context tokens sparse, supervised
ones dense), first with every block dense, then with one block alone (a layer's FFN or its attention) at each
level. For each it records what the budget bounds, the relative error of the output the loss reads (the last
hidden states at supervised positions, or at the token a classifier reads), and the FLOPs the sparsified
projections saved net of the estimator's own. What the budget bounds depends on the task (`MEASURES`): for
instruction tuning, the relative increase of the training loss, through the model's own pretrained LM head; for
classification, whose head is not trained yet (its loss at initialization barely moves whatever the backbone
computes), the relative squared error of the representation the head reads. The layers below a block's layer
are dense in both passes, so they are not computed again: they return what they returned in the dense pass of
the same batch.

The allocation picks at most one level per block so that the FLOPs saved are largest while the summed predicted
increases stay within the budget (a multiple-choice knapsack over the budget cut into `UNITS`). The predicted
increase of a level is the largest loss change, either way, measured at it or any lower level, so that noise
cannot make a sparser level look free. When nothing saves FLOPs within the budget (or the budget is 0), every
block stays dense: the run is LoRA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn

from peftlab.methods.sparselora.channels import (
    Block,
    Flops,
    NarrowLoraLinear,
    SparseProjection,
    SplitFfn,
)
from peftlab.models.load import unwrap
from peftlab.models.sites import layer_blocks
from peftlab.tasks.kinds import task_kind

UNITS = 1000  # the loss budget in knapsack units
MEASURES = {"loss": "relative training loss increase",
            "representation": "relative squared error of the representation the classifier reads"}


@dataclass
class BlockProfile:
    layer: int
    block: str  # "ffn" or "attention"
    increase: list[float]  # what the budget bounds, at each level (see `SparsityProfile.measure`)
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
    measure: str = "loss"  # what `increase` measures: a key of `MEASURES`
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
    held_out_increase: float | None = None  # and on as many validation batches


def block_name(block: Block) -> str:
    return "ffn" if type(block).__name__ == "FfnBlock" else "attention"


def measure_profile(model: nn.Module, blocks: Sequence[Block], batches: list[dict[str, torch.Tensor]], kind: str,
                    levels: Sequence[float], prepare_batch, state, reads_first: bool = True,
                    replay: bool = True) -> SparsityProfile:
    """Each block alone at each level, against every block dense, on `batches` (see the module's docstring).
    `prepare_batch` routes a batch as training does; `state` is the blocks' shared SparseState; `reads_first`:
    a classifier reads the first token (encoders' [CLS]), else the last real one. With `replay`, the layers below
    a block's layer return the outputs they gave in the dense pass of the same batch instead of computing them
    again (they are dense in both), which halves the profile's cost on average."""
    start = time.perf_counter()
    found = layer_blocks(unwrap(model)) if replay and blocks else None
    layers = found[0] if found is not None else None
    base = _Sums()
    runs = [[_Sums() for _ in levels] for _ in blocks]
    columns = (TextColumn("sparsity profile"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _profiling(model, blocks, state), Progress(*columns, transient=True, disable=not blocks) as progress:
        bar = progress.add_task("profile", total=len(batches) * len(blocks) * len(levels))
        for batch in batches:
            for b in blocks:
                b.sparsity = 0.0
            with _recording(layers) as recorded:
                dense = _run(model, batch, kind, prepare_batch, state, reads_first)
            base.add(dense, dense)
            for b, sums in zip(blocks, runs):
                with _replaying(layers, recorded, b.layer):
                    for level, total in zip(levels, sums):
                        b.sparsity = level
                        total.add(_run(model, batch, kind, prepare_batch, state, reads_first), dense)
                        progress.update(bar, advance=1)
                b.sparsity = 0.0
    measure = task_kind(kind).profile_measure
    profiles = [BlockProfile(b.layer, block_name(b), [_change(measure, t, base) for t in sums],
                             [math.sqrt(t.difference / base.size) if base.size else 0.0 for t in sums],
                             [t.saved / base.dense for t in sums])
                for b, sums in zip(blocks, runs)]
    examples = sum(len(b["input_ids"]) for b in batches)
    return SparsityProfile(list(levels), base.loss / max(base.count, 1), profiles, examples,
                           time.perf_counter() - start, measure)


def allocation_increase(model: nn.Module, blocks: Sequence[Block], batches: list[dict[str, torch.Tensor]], kind: str,
                        prepare_batch, state, reads_first: bool = True) -> float:
    """The blocks at their levels together against every block dense on `batches`, measured as the profile
    measures one block (its `measure`)."""
    levels = [b.sparsity for b in blocks]
    base, joint = _Sums(), _Sums()
    with _profiling(model, blocks, state):
        for batch in batches:
            for b in blocks:
                b.sparsity = 0.0
            dense = _run(model, batch, kind, prepare_batch, state, reads_first)
            for b, level in zip(blocks, levels):
                b.sparsity = level
            base.add(dense, dense)
            joint.add(_run(model, batch, kind, prepare_batch, state, reads_first), dense)
    return _change(task_kind(kind).profile_measure, joint, base)


def _change(measure: str, run: _Sums, dense: _Sums) -> float:
    if measure == "representation":
        return run.difference / dense.size if dense.size else 0.0
    return (run.loss - dense.loss) / dense.loss


@contextmanager
def _profiling(model: nn.Module, blocks: Sequence[Block], state) -> Iterator[None]:
    """The model in evaluation mode (no dropout, the functional kind in attention included) with its sparse
    modules in training mode (the sparse path runs in training mode only), the sparse path on and no key/value
    cache (decoders' classification heads); everything, the blocks' levels included, as it was after."""
    saved = [b.sparsity for b in blocks]
    modes = {m: m.training for m in model.modules()}
    config = unwrap(model).config
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    model.eval()
    for module in model.modules():
        if isinstance(module, (SparseProjection, SplitFfn, NarrowLoraLinear)):
            module.training = True
    active, state.active = state.active, True
    try:
        yield
    finally:
        for b, level in zip(blocks, saved):
            b.sparsity = level
        state.active = active
        for module, mode in modes.items():
            module.train(mode)
        if use_cache:
            config.use_cache = use_cache


@dataclass
class _Pass:
    loss: float  # summed over the batch's supervised tokens (classification: examples)
    count: int
    outputs: torch.Tensor
    flops: Flops


@dataclass
class _Sums:
    """One configuration's sums over the profile batches."""

    loss: float = 0.0
    count: int = 0
    difference: float = 0.0  # squared L2 distance of the outputs from the dense pass's
    size: float = 0.0  # squared L2 norm of the dense pass's outputs
    saved: int = 0  # FLOPs the sparsified projections saved, net of the estimator
    dense: int = 0  # what the sparsified projections would have executed dense

    def add(self, run: _Pass, dense: _Pass) -> None:
        self.loss += run.loss
        self.count += run.count
        self.difference += float((run.outputs - dense.outputs).pow(2).sum())
        self.size += float(dense.outputs.pow(2).sum())
        self.saved += run.flops.dense - run.flops.executed - run.flops.estimator
        self.dense += run.flops.dense


@contextmanager
def _recording(layers: nn.ModuleList | None) -> Iterator[list[Any]]:
    """What each of `layers` returns inside the `with` statement (nothing without `layers`)."""
    recorded: list[Any] = [None] * (len(layers) if layers is not None else 0)

    def keep(index: int):
        def hook(_module, _args, output):
            recorded[index] = output
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers or [])]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replaying(layers: nn.ModuleList | None, recorded: list[Any], below: int) -> Iterator[None]:
    """Layers below `below` return what they returned when recorded, without computing."""
    patched = []
    try:
        for layer, output in zip(list(layers or [])[:below], recorded):
            patched.append((layer, layer.__dict__.get("forward")))  # an accelerate hook's forward is kept
            layer.forward = partial(_recorded, output)
        yield
    finally:
        for layer, own in patched:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _recorded(output: Any, *_args: Any, **_kwargs: Any) -> Any:
    return output


@torch.no_grad()
def _run(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, prepare_batch, state,
         reads_first: bool) -> _Pass:
    """A batch's summed loss, the outputs the loss reads (`TaskKind.profile_pass`), and the FLOPs the projections
    counted."""
    state.flops = Flops()
    prepare_batch(batch)
    loss, count, outputs = task_kind(kind).profile_pass(model, batch, reads_first)
    flops, state.flops = state.flops, Flops()
    return _Pass(loss, count, outputs, flops)


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
