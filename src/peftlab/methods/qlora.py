"""QLoRA (Dettmers et al., 2023): LoRA on the plan over a base whose linear layers are stored in 4-bit
NF4 with double quantization (bitsandbytes), on CPU or CUDA.

The task head and the output embeddings stay in full precision (a freshly initialised head cannot be
quantized, and the output embeddings are often tied to the input ones). Merging the adapters into 4-bit
weights would re-quantize them and lose the update, so QLoRA merges into a 16-bit copy of the base:
`merged_model` dequantizes, loads the trained adapters onto the copy and folds them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.lora import LoraMethod
from peftlab.models.load import unwrap
from peftlab.models.quantize import (
    DTYPES,
    Quantized,
    dequantized_weight,
    is_4bit,
    quantize_4bit,
)
from peftlab.plans.plan import Plan


def compute_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


class QLoraMethod(LoraMethod):
    name = "qlora"
    shardable = False  # bitsandbytes' 4-bit weights are not sharded by FSDP2

    def check_device(self, device: str) -> None:
        if device == "mps":
            raise PeftlabError("method qlora cannot run on mps: bitsandbytes' 4-bit kernels have no MPS backend; "
                               "use method lora, or train.device cpu or cuda")
        super().check_device(device)

    def base_identity(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json", include={"quant_type", "double_quant", "blocksize", "compute_dtype"})

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        slices = [p.site for p in plan.sites if p.site.is_slice]
        if slices:
            raise PeftlabError(f"method qlora: {slices[0].role} is a slice of the fused projection {slices[0].path}; "
                               "QLoRA adapts whole modules: select all its parts with placement.fused: whole, or use "
                               "method lora")
        output = model.get_output_embeddings()
        skip = list(head) + [name for name, module in model.named_modules() if output is not None and module is output]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.quantized: Quantized = quantize_4bit(
            model, skip, compute_dtype(self.spec.compute_dtype), self.spec.quant_type, self.spec.double_quant,
            self.spec.blocksize, device)
        self._plan, self._head = plan, head
        self._config = model.config
        return super().apply(model, plan, head)

    def trainable_for(self, skeleton: nn.Module, plan: Plan, head: list[str]) -> int:
        return LoraMethod(self.spec).trainable_for(skeleton, plan, head)  # the adapters are LoRA's

    def peft_overrides(self) -> dict[str, Any]:
        return {"fan_in_fan_out": False}  # GPT-2's Conv1D layers are 4-bit Linear layers now

    def merge(self, model: nn.Module) -> None:
        raise PeftlabError("method qlora: merging into 4-bit weights would re-quantize them; "
                           "use merged_model(), which merges into a 16-bit copy")

    unmerge = merge

    @contextmanager
    def merged(self, model: nn.Module) -> Iterator[nn.Module]:
        yield self.merged_model(model)  # nothing to undo: the 4-bit model is never changed

    def merged_model(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain transformers model in `merge_dtype` (or `dtype`): the dequantized base with the trained
        adapters (and head) folded in. The 4-bit model is left as it is."""
        base = unwrap(model)
        device = next(model.parameters()).device
        state: dict[str, torch.Tensor] = {}
        for name, module in base.named_modules():
            if is_4bit(getattr(module, "weight", None)):
                key = _plain_name(name)
                weight = dequantized_weight(module)
                state[key + ".weight"] = weight.t() if key in self.quantized.transposed else weight
                if module.bias is not None:
                    state[key + ".bias"] = module.bias.detach().float()
        tensors = list(base.named_parameters(remove_duplicate=False)) + list(base.named_buffers(remove_duplicate=False))
        for name, tensor in tensors:
            if ".lora_" in name or "modules_to_save." in name or is_4bit(tensor):
                continue
            state.setdefault(_plain_name(name), tensor.detach())
        copy = type(base)(self._config)
        copy.load_state_dict(state, strict=False)
        missing = set(copy.state_dict()) - set(state)
        if missing:
            raise PeftlabError(f"method qlora: the 16-bit copy lacks {sorted(missing)[:3]}")
        adapted = LoraMethod(self.spec).apply(copy.to(device), self._plan, self._head)
        set_peft_model_state_dict(adapted, get_peft_model_state_dict(model))
        merged = adapted.merge_and_unload()
        return merged.to(dtype or DTYPES[self.spec.merge_dtype]).eval()


def _plain_name(name: str) -> str:
    """A parameter's name in the bare model: without PEFT's wrapper levels."""
    return name.replace(".base_layer", "").replace(".original_module", "")
