"""LoRA on output slices of a fused projection (GPT-2's `c_attn` = [q | k | v]), as in the LoRA
paper's GPT-2 runs: adapting only q and v writes only their slices. PEFT can only adapt the whole
module (huggingface/peft#570), so this is peftlab's own module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.methods.low_rank import low_rank_linear
from peftlab.plans.plan import PlannedSite

WEIGHTS, LAYOUT = "fused_slices.safetensors", "fused_slices.json"


class SliceLoRA(nn.Module):
    """base(x) plus, for each planned slice [start, stop), scale * B A x written into that slice only."""

    def __init__(self, base: nn.Module, planned: list[PlannedSite], dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.conv1d = planned[0].site.kind == "conv1d"  # Conv1D stores its weight as (in, out)
        self.slices = [p.site.out_slice for p in sorted(planned, key=lambda p: p.site.out_slice)]
        ordered = sorted(planned, key=lambda p: p.site.out_slice)
        self.scales = [p.alpha / p.rank for p in ordered]
        fan_in = ordered[0].site.in_features
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for p in ordered:
            a = torch.empty(p.rank, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT initialises A
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(p.site.out_features, p.rank)))  # B = 0: starts at the base
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., 3h)
        if self.merged:
            return out
        h = self.dropout(x)
        pieces, position = [], 0
        for (start, stop), a, b, scale in zip(self.slices, self.lora_A, self.lora_B, self.scales):
            pieces += [out[..., position:start], out[..., start:stop] + scale * low_rank_linear(low_rank_linear(h, a), b)]
            position = stop
        pieces.append(out[..., position:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def _fold(self, sign: int) -> None:
        weight = self.base.weight
        for (start, stop), a, b, scale in zip(self.slices, self.lora_A, self.lora_B, self.scales):
            delta = sign * scale * (b @ a)  # (width, in)
            if self.conv1d:
                weight[:, start:stop] += delta.T.to(weight.dtype)
            else:
                weight[start:stop] += delta.to(weight.dtype)

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1)
            self.merged = False


def wrap_slices(model: nn.Module, planned: list[PlannedSite], dropout: float) -> dict[str, SliceLoRA]:
    """Replace each fused module that has planned slices with a SliceLoRA around it."""
    by_path: dict[str, list[PlannedSite]] = {}
    for p in planned:
        by_path.setdefault(p.site.path, []).append(p)
    wrapped = {}
    for path, sites in by_path.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        module = SliceLoRA(getattr(parent, child), sites, dropout).to(getattr(parent, child).weight.device)
        setattr(parent, child, module)
        wrapped[path] = module
    return wrapped


def slice_modules(model: nn.Module) -> dict[str, SliceLoRA]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: m for name, m in base.named_modules() if isinstance(m, SliceLoRA)}


def save_slices(model: nn.Module, directory: Path) -> None:
    modules = slice_modules(model)
    if not modules:
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors, layout = {}, {}
    for path, m in modules.items():
        layout[path] = {"slices": m.slices, "scales": m.scales, "ranks": [a.shape[0] for a in m.lora_A]}
        for i, (a, b) in enumerate(zip(m.lora_A, m.lora_B)):
            tensors[f"{path}.lora_A.{i}"] = a.detach().contiguous()
            tensors[f"{path}.lora_B.{i}"] = b.detach().contiguous()
    save_file(tensors, str(directory / WEIGHTS))
    (directory / LAYOUT).write_text(json.dumps(layout, indent=2))


def load_slices(model: nn.Module, directory: Path) -> None:
    """Load saved slice weights into a model whose slices were wrapped from the same plan (none: nothing)."""
    modules = slice_modules(model)
    if not modules:
        return
    tensors = load_file(str(directory / WEIGHTS))
    for path, m in modules.items():
        for i, (a, b) in enumerate(zip(m.lora_A, m.lora_B)):
            a.data.copy_(tensors[f"{path}.lora_A.{i}"])
            b.data.copy_(tensors[f"{path}.lora_B.{i}"])
