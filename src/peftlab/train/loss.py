"""Summed negative log-likelihood of a batch and how many predictions it covers.

Returning (sum, count) instead of a mean lets evaluation weight every supervised token (or example)
equally across batches of uneven length: eval loss = sum of NLL / number of predictions. Each task kind
computes its own (`tasks.kinds`).
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.tasks.kinds import HiddenStates, task_kind

__all__ = ["HiddenStates", "batch_nll"]


def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, hidden_states: HiddenStates | None = None):
    """(summed NLL, predictions counted, class logits or None) for a task kind; `hidden_states`: the
    method's causal-LM forward (default: the backbone's)."""
    return task_kind(kind).nll(model, batch, hidden_states)
