"""Classification with an encoder: the last layer computed only where the head reads.

The head of a BERT-family or DistilBERT sequence classifier (BERT, MiniLM, RoBERTa, ELECTRA, DistilBERT)
reads the last layer's output at one position, [CLS] (position 0). The last layer's attention still
needs the keys and values of every position, but what follows matters at [CLS] alone. A forward pre-hook
slices the input of one module of the last layer to position 0, so everything after it in that layer
runs on one position:
- BERT family: the attention output module (output projection, residual, layer norm), then the FFN:
  about three quarters of the last layer's FLOPs (an eighth of MiniLM-L6's);
- DistilBERT: the layer norm after attention, then the FFN: about two thirds of the last layer's.
In training and evaluation the logits and gradients are the full forward's up to float rounding (with
dropout, the last layer draws fewer dropout masks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftlab.methods.base import Method
from peftlab.models.sites import layer_blocks, model_family
from peftlab.tasks.kinds import task_kind
from peftlab.train.speed.base import RunSetting, SpeedFeature


class LastLayerAtHead(SpeedFeature):
    name = "last_layer_at_head"

    def __init__(self) -> None:
        self.handle: RemovableHandle | None = None

    def install(self, model: nn.Module, method: Method, run: RunSetting) -> dict[str, Any] | None:
        self.handle = last_layer_at_head(model, run.kind, method)
        return {"used": True} if self.handle is not None else None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def last_layer_at_head(model: nn.Module, kind: str, method: Method) -> RemovableHandle | None:
    """Hook the model so its last layer runs at [CLS] only after attention; the hook's handle (remove it
    for the model's own forward), or None where it does not apply: other tasks and families (decoders
    read the last token), methods that route or add positions (SparseLoRA, prompts)."""
    family = model_family(model)
    found = layer_blocks(model)
    if task_kind(kind).head != "sequence-classification" or family is None or family.sliced_from is None or found is None:
        return None
    if not method.position_wise:
        return None
    try:
        target = found[0][-1].get_submodule(family.sliced_from)
    except AttributeError:  # another layout of the family
        return None
    return target.register_forward_pre_hook(_first_position, with_kwargs=True)


def _first_position(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The module's (batch, position, hidden) inputs at position 0 only."""
    def first(value: Any) -> Any:
        return value[:, :1] if torch.is_tensor(value) and value.dim() == 3 else value

    return tuple(first(a) for a in args), {k: first(v) for k, v in kwargs.items()}
