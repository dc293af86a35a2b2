"""Summed negative log-likelihood of a batch and how many predictions it covers.

Returning (sum, count) instead of a mean lets evaluation weight every supervised token (or example)
equally across batches of uneven length: eval loss = sum of NLL / number of predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from peftlab.models.load import unwrap
from peftlab.tasks.prepare import IGNORE


def is_prompt_learning(model: nn.Module) -> bool:
    return (isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning
            and not getattr(model, "prompt_disabled", False))


def prompt_learning_hidden(model: PeftModel, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden states at the batch's own positions, with the learned prefix or prompt
    in front, so the causal-LM loss can still run the LM head only where tokens are supervised."""
    config = model.active_peft_config
    size, n = batch["input_ids"].shape[0], config.num_virtual_tokens
    mask = torch.cat([batch["attention_mask"].new_ones(size, n), batch["attention_mask"]], dim=1)
    if config.peft_type == "PREFIX_TUNING":
        return backbone(input_ids=batch["input_ids"], attention_mask=mask,
                        past_key_values=model.get_prompt(size)).last_hidden_state
    embeds = backbone.get_input_embeddings()(batch["input_ids"])
    prompts = model.get_prompt(size).to(embeds.dtype)
    hidden = backbone(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask).last_hidden_state
    return hidden[:, n:]


def causal_lm_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, None]:
    """NLL of the supervised next tokens, computing the LM head only at those positions: the head
    of a 262k-token vocabulary would otherwise dominate memory (B x T x V logits)."""
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)  # adapters inside it still apply
    if is_prompt_learning(model):  # prefix / prompt tuning: the learned tokens go in front
        hidden = prompt_learning_hidden(model, backbone, batch)
    else:
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False).last_hidden_state  # no key/value cache: nothing generates
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


def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor], kind: str):
    """(summed NLL, predictions counted, class logits or None) for a task kind."""
    return classification_nll(model, batch) if kind == "classification" else causal_lm_nll(model, batch)
