"""Gradient checkpointing (`train.gradient_checkpointing`): each layer's activations are recomputed in the
backward pass instead of kept, trading time for memory; what is learned does not change.

Non-reentrant (`torch.utils.checkpoint` with use_reentrant=False): the layers' inputs need no requires_grad,
so autograd still stops below the lowest adapter, and dropout masks are replayed exactly."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method
from peftlab.models.load import unwrap
from peftlab.train.speed.base import RunSetting, SpeedFeature


class GradientCheckpointing(SpeedFeature):
    name = "gradient_checkpointing"

    def install(self, model: nn.Module, method: Method, run: RunSetting) -> dict[str, Any]:
        self.base = unwrap(model)
        if not getattr(self.base, "supports_gradient_checkpointing", False):
            raise PeftlabError(f"train.gradient_checkpointing: {type(self.base).__name__} does not support it")
        settings = {"use_reentrant": False}
        if hasattr(self.base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
            self.base.activation_checkpointing_enable(settings)
        else:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
        return {"used": True}

    def remove(self) -> None:
        if hasattr(self.base, "activation_checkpointing_disable"):
            self.base.activation_checkpointing_disable()
        else:
            self.base.gradient_checkpointing_disable()
