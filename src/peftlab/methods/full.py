"""Full fine-tuning: every parameter trains. The plan is recorded but places nothing."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from peftlab.methods.base import Method, load_weights
from peftlab.plans.plan import Plan


class FullMethod(Method):
    name = "full"
    shardable = True
    size_parameter = None

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """The saved weights (tied weights are saved once and stay tied)."""
        load_weights(model, directory / "model.safetensors")
        return model
