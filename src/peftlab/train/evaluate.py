"""Evaluation: token-weighted loss and perplexity; accuracy and macro-F1 for classification."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from peftlab.train import distributed
from peftlab.train.loss import HiddenStates, batch_nll


def macro_f1(predictions: list[int], golds: list[int], n_labels: int) -> float:
    scores = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(predictions, golds))
        fp = sum(p == c and g != c for p, g in zip(predictions, golds))
        fn = sum(p != c and g == c for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_labels


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], kind: str, n_labels: int, device,
             autocast: Callable[[], AbstractContextManager] = nullcontext,
             hidden_states: HiddenStates | None = None) -> dict[str, float]:
    """Loss = total NLL / total predictions over the whole split (never a mean of batch means), at the
    training's precision (`autocast`); `hidden_states`: the method's causal-LM forward (see `batch_nll`).
    Over several processes, each evaluates every `count`-th batch and the sums are gathered."""
    was_training = model.training
    model.eval()
    total_nll, total_count = 0.0, 0
    predictions: list[int] = []
    golds: list[int] = []
    batches = list(batches)[distributed.process_index()::distributed.process_count()] if distributed.active() else batches
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            nll, count, logits = batch_nll(model, batch, kind, hidden_states)
        total_nll += nll.item()
        total_count += int(count)
        if logits is not None:
            predictions += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
    model.train(was_training)
    if distributed.active():
        total_nll, total_count = distributed.sum_across([total_nll, float(total_count)])
        total_count = int(total_count)
        predictions, golds = distributed.gather_lists(predictions), distributed.gather_lists(golds)
    loss = total_nll / max(total_count, 1)
    metrics = {"loss": loss, "count": total_count}
    if kind == "classification":
        metrics["accuracy"] = sum(p == g for p, g in zip(predictions, golds)) / max(len(golds), 1)
        metrics["macro_f1"] = macro_f1(predictions, golds, n_labels)
        # what a trivial classifier scores here, and whether this one is one (see analysis.degenerate)
        metrics["majority_rate"] = max(map(golds.count, set(golds))) / len(golds) if golds else math.nan
        metrics["predicted_classes"] = len(set(predictions))
    else:
        metrics["perplexity"] = math.exp(loss) if loss < 700 else math.inf
    return metrics
