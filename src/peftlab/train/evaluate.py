"""Evaluation: the token- (or example-) weighted loss over a split and the task kind's scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from peftlab.tasks.kinds import HiddenStates, task_kind
from peftlab.train import distributed


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], kind: str, n_labels: int, device,
             autocast: Callable[[], AbstractContextManager] = nullcontext,
             hidden_states: HiddenStates | None = None, lockstep: bool = False) -> dict[str, float]:
    """Loss = total NLL / total predictions over the whole split (never a mean of batch means), at the
    training's precision (`autocast`); `hidden_states`: the method's causal-LM forward (see `TaskKind.nll`).
    Over several processes, each evaluates every `count`-th batch and the sums are gathered; in `lockstep`
    (sharded layers: every forward pass gathers weights from all processes), each runs as many forward passes,
    a process short of a batch in the last round running its first one again and counting nothing."""
    was_training = model.training
    model.eval()
    total_nll, total_count = 0.0, 0
    predictions: list[int] = []
    golds: list[int] = []
    handler = task_kind(kind)
    for batch, counted in _share(list(batches), lockstep):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            nll, count, outputs = handler.nll(model, batch, hidden_states)
        if not counted:
            continue
        total_nll += nll.item()
        total_count += int(count)
        if outputs is not None:
            predictions += handler.predictions(outputs)
            golds += batch["labels"].tolist()
    model.train(was_training)
    if distributed.active():
        total_nll, total_count = distributed.sum_across([total_nll, float(total_count)])
        total_count = int(total_count)
        predictions, golds = distributed.gather_lists(predictions), distributed.gather_lists(golds)
    loss = total_nll / max(total_count, 1)
    return {"loss": loss, "count": total_count, **handler.scores(loss, predictions, golds, n_labels)}


def _share(batches: list[dict[str, torch.Tensor]], lockstep: bool) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This process's batches, each with whether it counts: every `count`-th batch over several processes, plus,
    in `lockstep`, the first batch again (not counted) for each round another process still has a batch in."""
    if not distributed.active():
        return [(b, True) for b in batches]
    mine = [(b, True) for b in batches[distributed.process_index()::distributed.process_count()]]
    if lockstep and batches:
        rounds = -(-len(batches) // distributed.process_count())
        mine += [(batches[0], False)] * (rounds - len(mine))
    return mine
