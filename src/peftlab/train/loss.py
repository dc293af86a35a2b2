"""Summed negative log-likelihood of a batch and how many predictions it covers.

Returning (sum, count) instead of a mean lets evaluation weight every supervised token (or example)
equally across batches of uneven length: eval loss = sum of NLL / number of predictions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.base import backbone_hidden
from peftlab.models.load import unwrap
from peftlab.tasks.prepare import IGNORE

HiddenStates = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def causal_lm_nll(model: nn.Module, batch: dict[str, torch.Tensor],
                  hidden_states: HiddenStates = backbone_hidden) -> tuple[torch.Tensor, torch.Tensor, None]:
    """NLL of the supervised next tokens, computing the LM head only at those positions: the head
    of a 262k-token vocabulary would otherwise dominate memory (B x T x V logits). `hidden_states` is the
    method's own forward where it adds positions (`Method.hidden_states`: prefix and prompt tuning)."""
    base = unwrap(model)
    hidden = hidden_states(model, batch)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE  # (B, T-1)
    logits = base.get_output_embeddings()(hidden[:, :-1][supervised])  # (N, V)
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    nll = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
    return nll, supervised.sum(), None


def classification_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return nll, torch.tensor(len(logits), device=logits.device), logits


def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, hidden_states: HiddenStates | None = None):
    """(summed NLL, predictions counted, class logits or None) for a task kind; `hidden_states`: the
    method's causal-LM forward (default: the backbone's)."""
    if kind == "classification":
        return classification_nll(model, batch)
    return causal_lm_nll(model, batch, hidden_states or backbone_hidden)
