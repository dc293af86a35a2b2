"""LoRA's A and B products with a weight gradient that CPUs compute fast.

For y = x W^T autograd computes the weight gradient as grad_y^T @ x. When W is LoRA's B (out x r,
out in the thousands), that is a (out x N) transposed view times a skinny (N x r) matrix, a shape the
CPU BLAS handles badly: with out = N = 2048 and r = 8 it takes ~20 ms on one core, against ~1.5 ms for
the same product computed as (x^T @ grad_y)^T. `low_rank_linear` computes each weight gradient in the
orientation whose result has the fewer rows. Values are those of F.linear (tested); off the CPU it is
F.linear itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _LowRankProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows, flat = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            out_features, in_features = weight.shape
            grad_weight = (flat.t() @ rows).t() if out_features > in_features else rows.t() @ flat
        return grad_x, grad_weight


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, with the CPU-friendly weight gradient."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    if torch.is_autocast_enabled("cpu"):  # cast as autocast would, so the backward runs in that dtype too
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
    return _LowRankProduct.apply(x, weight)


class LowRankLinear(nn.Linear):
    """An nn.Linear without bias (LoRA's A or B) whose forward is `low_rank_linear`; same parameters,
    same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_linear(x, self.weight)


def use_low_rank_linears(model: nn.Module) -> int:
    """Make every bias-free LoRA A and B nn.Linear of PEFT's LoRA layers a LowRankLinear; returns how many."""
    count = 0
    for module in model.modules():
        for name in ("lora_A", "lora_B"):
            linears = getattr(module, name, None)
            if not isinstance(linears, nn.ModuleDict):
                continue
            for linear in linears.values():
                if type(linear) is nn.Linear and linear.bias is None:
                    linear.__class__ = LowRankLinear
                    count += 1
    return count
