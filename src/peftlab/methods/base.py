"""The Method interface: what every fine-tuning method gives the loop, the run and the study.

Nothing outside a method asks which method it runs. Its hooks, in the order a run calls them:

1. resolve (`peftlab.resolve`), before any data or weights load: `check_device`, `check_plan`,
   `reads_training_data`; a budget match varies `size_parameter` through `sized_spec` / `trainable_for`.
2. build: `apply` (freeze, wrap the planned sites), then `initialize` with a few training batches (EVA,
   calibrated sparsity).
3. references, before training: the base model's loss and completions under `bypassed`, cached by
   `base_identity`.
4. train, per micro-batch: `prepare_batch`, `hidden_states` (the causal-LM forward), `regularization`; per
   optimizer step: `param_groups` (once), `on_step`.
5. evaluate and generate: `hidden_states`, and `complete` on the model `merged` yields.
6. time: the forward unmerged, `bypassed` and `merged`.
7. save: `save` (and `load` to read it back); `report` is stored with the result and `summary_rows` print it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.models.load import backbone_hidden
from peftlab.models.sites import Site
from peftlab.plans.plan import Plan


def generated_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: Any,
                     **extra: Any) -> torch.Tensor:
    """`model.generate`'s new tokens after the (left-padded) prompts: batch x new tokens. `extra` goes to
    `generate` (stopping criteria)."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra)[
        :, input_ids.shape[1]:]


class Method(ABC):
    name: ClassVar[str]
    adds_parameters: ClassVar[bool] = False  # LoRA adds A and B; full and BitFit train existing ones
    mergeable: ClassVar[bool] = False
    size_parameter: ClassVar[str | None] = "rank"
    """What sets the method's size: the planned ranks ("rank"), a field of its spec (prefix tuning's
    "num_virtual_tokens"), or nothing (full fine-tuning, BitFit). The equal-budget helper varies it."""
    resumable: ClassVar[bool] = True
    """What a training checkpoint restores is all the state there is (no allocator or schedule outside the
    parameters, optimizer and step), so a run resumed from one trains on as if it had not stopped."""
    shardable: ClassVar[bool] = False
    """Its parameters are read only inside the model's forward (no penalty, rank allocator or calibration between
    steps, no data-driven init), so its layer blocks can be split over processes (`train.sharding: fsdp`)."""
    position_wise: ClassVar[bool] = True
    """Its modules compute every position on its own and keep no per-position state, so a layer may run
    on fewer positions (see `train.last_layer_at_head`)."""

    def __init__(self, spec: Any, total_steps: int | None = None):
        self.spec = spec
        self.total_steps = total_steps  # optimizer steps of the run, for methods with a schedule

    @property
    def label(self) -> str:
        """The method's name in messages (`peft LOHA` for a PEFT type)."""
        return self.spec.label

    @abstractmethod
    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        """Freeze what the method does not train; return the model to train.
        `head` names the task head's modules (trained by every method)."""

    def check_plan(self, plan: Plan) -> None:
        """Refuse, in one line, a plan this method cannot serve (an init a layer kind does not support): called
        where a run is resolved, before any data or weights load."""

    def check_device(self, device: str) -> None:
        """Refuse, in one line, a device type ("cuda", "mps", "cpu") the method cannot train on."""

    def base_identity(self) -> dict[str, Any]:
        """What, beside the model's files, sets the weights the base model computes with (QLoRA's 4-bit
        quantization): part of the key of the cached base-model completions."""
        return {}

    @classmethod
    def summary_rows(cls, report: dict[str, Any]) -> list[tuple[str, str]]:
        """(label, value) rows `peftlab run` prints from the method's `report` (SparseLoRA's FLOPs)."""
        return []

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; biases and norms get no weight decay."""
        decay, no_decay = [], []
        for _, param in model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @property
    def reads_training_data(self) -> bool:
        """Whether `initialize` draws on the whole training split: then a run of a few steps tokenizes all of it,
        not only the examples its steps draw (`train.max_steps`)."""
        return False

    def initialize(self, model: nn.Module, batches: list[dict[str, torch.Tensor]],
                   held_out: list[dict[str, torch.Tensor]] = ()) -> None:
        """Called once before training with a few training batches, for methods that start from the data
        (LoRA's EVA init), and as many validation batches, for checks on data the method did not fit
        (SparseLoRA's calibrated sparsity)."""

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Called before each training micro-batch's forward, with the batch (SparseLoRA routes its
        tokens: supervised outputs dense, context sparse)."""

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step, before gradients are cleared (step counts from 1)."""

    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden states at the batch's own positions, from which the causal-LM loss runs the head
        where tokens are supervised. Methods that add positions (prefix and prompt tuning) override it."""
        return backbone_hidden(model, batch)

    def complete(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: Any, **extra: Any) -> torch.Tensor:
        """The tokens `model.generate` adds after the left-padded prompts (batch x new tokens). Methods whose
        learned positions `generate` would not see (prefix and prompt tuning) override it."""
        return generated_tokens(model, input_ids, attention_mask, config, **extra)

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss (AdaLoRA's orthogonality penalty); None for most methods."""
        return None

    def report(self, model: nn.Module) -> dict[str, Any]:
        """What the method learned beyond its weights, stored with the run result (AdaLoRA's final ranks)."""
        return {}

    def bypassed(self, model: nn.Module) -> AbstractContextManager | None:
        """For methods that cannot merge: a context in which the model runs as the bare base, so
        their inference overhead can be measured. None when not applicable."""
        return None

    def merge(self, model: nn.Module) -> None:
        """Fold the method's parameters into the base weights (only when `mergeable`)."""
        raise NotImplementedError(f"{self.name} cannot be merged")

    def unmerge(self, model: nn.Module) -> None:
        raise NotImplementedError(f"{self.name} cannot be merged")

    @contextmanager
    def merged(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the method folded into its weights, for inference. In place by default
        (undone on exit); QLoRA yields a 16-bit copy instead of touching its 4-bit base."""
        self.merge(model)
        try:
            yield model
        finally:
            self.unmerge(model)

    def sized_spec(self, size: int) -> Any:
        """The method's spec with its size parameter (not a rank: ranks are the plan's) set to `size`."""
        return self.spec.model_copy(update={self.size_parameter: size})

    def size_candidates(self, plan: Plan) -> list[int] | None:
        """The sizes valid on `plan`, in increasing order, when not every size from 1 up is (block sizes
        that must divide the input widths); None: 1, 2, 3, ..."""
        return None

    @property
    def counted_per_site(self) -> bool:
        """Its trainable parameters are the sum of `site_params` over the plan (`cost.plan_params`)."""
        return self.size_parameter == "rank"

    def site_params(self, site: Site, rank: int) -> int:
        """Trainable parameters the method adds at one planned site of rank `rank` (a rank method's plan count;
        LoRA's A is r x in, B is out x r)."""
        return rank * (site.in_features + site.out_features)

    def trainable_for(self, skeleton: nn.Module, plan: Plan, head: list[str]) -> int:
        """The method's own trainable parameters on `skeleton` (a model on the meta device)."""
        return trainable_counts(self.apply(skeleton, plan, head), head)["adapter"]

    @abstractmethod
    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what was trained, in a format that loads back (PEFT format for adapters)."""

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        """What `save` wrote, loaded into `model`, to which this method was applied with the same plan. PEFT
        format by default (PEFT's own wrapper: LoRA, QLoRA, AdaLoRA, HiRA)."""
        load_weights(model, directory / "adapter_model.safetensors", peft=True)
        return model


def load_weights(model: nn.Module, file: Path, peft: bool = False, loaded_elsewhere: tuple[str, ...] = ()) -> None:
    """Saved tensors into `model` by name (PEFT's naming with `peft`). Parameters the file leaves out keep
    their values (frozen weights are not saved); a name the model does not have is an error, except those
    `loaded_elsewhere` (PEFT loads a prompt into its encoder itself and still lists it)."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    if peft:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
    else:
        result = model.load_state_dict(tensors, strict=False)
    unexpected = [k for k in result.unexpected_keys if k not in loaded_elsewhere]
    if unexpected:
        raise PeftlabError(f"{file}: weights for modules this model does not have: {unexpected[:3]}")


def trainable_counts(model: nn.Module, head: list[str]) -> dict[str, int]:
    """Trainable parameters split into the method's own and the task head's."""
    counts = {"adapter": 0, "head": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_head = any(part in head for part in name.split("."))
            counts["head" if in_head else "adapter"] += param.numel()
    return counts


def set_head_trainable(model: nn.Module, head: list[str]) -> None:
    for name in head:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
