"""The interface of a speed feature (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.methods.base import Method


@dataclass(frozen=True)
class RunSetting:
    """What a feature may read of the run it speeds up."""

    kind: str  # classification | instruction
    train: list[dict[str, Any]]  # the tokenized training examples (`index` in a batch points here)
    data_key: str  # identifies the tokenized data (for caches)
    pad_id: int
    batch_size: int  # for work done outside training (evaluation-sized batches)
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    precision: str  # accelerate's mixed precision: no | bf16 | fp16
    batching: str = "bucketed"  # train.batching: a packed row holds several examples
    sharded: bool = False  # the layer blocks are split over the processes (`train.sharding: fsdp`)


class SpeedFeature:
    name: ClassVar[str]  # also its switch in `train:`

    def install(self, model: nn.Module, method: Method, run: RunSetting) -> dict[str, Any] | None:
        """Prepare the feature on the adapted model; what it did, or None where it does not apply."""
        raise NotImplementedError

    def batch(self, index: torch.Tensor, length: int, device: torch.device) -> AbstractContextManager:
        """The context one training micro-batch runs in (`index`: its examples; `length`: its padded length)."""
        return nullcontext()

    def remove(self) -> None:
        """Undo what changes the model's forward (before latency is timed)."""


def installed(features: list[SpeedFeature], model: nn.Module, method: Method,
              run: RunSetting) -> tuple[list[SpeedFeature], dict[str, dict[str, Any]]]:
    """Install `features` in order: the ones that apply, and what each reported (None where it did not apply)."""
    active, report = [], {}
    for feature in features:
        report[feature.name] = feature.install(model, method, run)
        if report[feature.name] is not None and report[feature.name].get("used", True):
            active.append(feature)
    return active, report


def batch_context(features: list[SpeedFeature], index: torch.Tensor, length: int,
                  device: torch.device) -> AbstractContextManager:
    """Every feature's context for one micro-batch, entered together."""
    stack = ExitStack()
    for feature in features:
        stack.enter_context(feature.batch(index, length, device))
    return stack
