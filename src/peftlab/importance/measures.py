"""Importance measures per site, from gradients, activations or a learned update.

Every measure reduces to one `score` per site (higher = give it more rank) plus details. Weights are
viewed as (out, in) matrices; a fused q/k/v site's part is its rows of the fused weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.models.sites import Site


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen linear under any adapter wrappers (PEFT's `base_layer`, a slice LoRA's `base`)."""
    while not isinstance(module, (nn.Linear, Conv1D)):
        inner = getattr(module, "base_layer", None)
        module = inner if inner is not None else module.base
    return module


def site_matrix(weight: torch.Tensor, site: Site) -> torch.Tensor:
    """The site's weight (or a tensor shaped like it) as an (out, in) matrix: Conv1D stores (in, out)."""
    matrix = weight.T if site.kind == "conv1d" else weight
    return matrix[site.out_slice[0] : site.out_slice[1]] if site.out_slice else matrix


class GradientSensitivity:
    """AdaLoRA's smoothed sensitivity: I = |w * dL/dw| per weight, its moving average I_bar and the
    moving average U_bar of |I - I_bar| (uncertainty); a weight's importance is I_bar * U_bar."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.mean: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def update(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        now = (weight * grad).abs()
        mean = self.mean.get(name, torch.zeros_like(now))
        mean = self.beta1 * mean + (1 - self.beta1) * now
        uncertainty = self.uncertainty.get(name, torch.zeros_like(now))
        self.uncertainty[name] = self.beta2 * uncertainty + (1 - self.beta2) * (now - mean).abs()
        self.mean[name] = mean

    def site_scores(self, name: str, site: Site) -> dict[str, float]:
        mean = site_matrix(self.mean[name], site)
        uncertainty = site_matrix(self.uncertainty[name], site)
        return {"score": float((mean * uncertainty).mean()), "sensitivity": float(mean.mean())}


class Fisher:
    """The diagonal empirical Fisher information from mini-batch gradients: mean of dL/dw squared."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}

    def update(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        self.total[name] = self.total.get(name, torch.zeros_like(grad)) + grad.double() ** 2
        self.batches[name] = self.batches.get(name, 0) + 1

    def site_scores(self, name: str, site: Site) -> dict[str, float]:
        return {"score": float(site_matrix(self.total[name], site).mean() / max(self.batches.get(name, 0), 1))}


GRADIENT_SCORES = {"gradient": GradientSensitivity, "fisher": Fisher}
"""The accumulator of each measure of the gradient probe (`plans.allocation.MEASURES`)."""


class InputCovariance:
    """Running mean and covariance of a module's input rows (non-padding tokens), in float64."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.gram = torch.zeros(width, width, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:  # (N, in)
        rows = rows.detach().double()
        self.count += len(rows)
        self.total += rows.sum(0)
        self.gram += rows.T @ rows

    def explained_variance(self) -> torch.Tensor:
        """Variance ratio of each principal direction, descending (all zero for a constant input)."""
        if self.count == 0:
            return torch.zeros(len(self.total), dtype=torch.float64)
        mean = self.total / self.count
        covariance = self.gram / self.count - torch.outer(mean, mean)
        variances = torch.linalg.eigvalsh(covariance).flip(0).clamp(min=0)
        total = variances.sum()
        return variances / total if total > 0 else torch.zeros_like(variances)


def pooled_ranks(ratios: Sequence[torch.Tensor], rank: float, rho: float = 2.0) -> list[int]:
    """EVA's allocation: each site offers its top rho x rank directions; the n_sites x rank directions
    with the highest explained-variance ratio over all sites are kept; a site's score is how many are its own."""
    per_site = max(1, math.ceil(rho * rank))
    budget = round(rank * len(ratios))
    pool = [(-float(r), i, j) for i, site_ratios in enumerate(ratios) for j, r in enumerate(site_ratios[:per_site]) if r > 0]
    counts = [0] * len(ratios)
    for _, i, _ in sorted(pool)[:budget]:
        counts[i] += 1
    return counts


def update_spectrum(delta: torch.Tensor, rank: int | None = None) -> dict[str, float]:
    """Singular values of a learned update B A (its top `rank` when given: a rank-r LoRA has no more).

    effective_rank: exp of the entropy of the normalised singular values (Roy and Vetterli, 2007), which is
    k for k equal singular values and 0 for a zero update; rank_90: directions holding 90% of the squared
    norm; energy_top1: the share of the first; norm: the Frobenius norm.
    """
    values = torch.linalg.svdvals(delta.detach().double())
    if rank is not None:
        values = values[:rank]
    total = values.sum()
    if total <= 0:
        return {"effective_rank": 0.0, "rank_90": 0, "energy_top1": 0.0, "norm": 0.0}
    p = values / total
    p = p[p > 0]
    effective = float(torch.exp(-(p * p.log()).sum()))
    squares = values**2
    cumulative = squares.cumsum(0) / squares.sum()
    directions = int((cumulative < 0.9 - 1e-12).sum()) + 1
    return {"effective_rank": effective, "rank_90": directions, "energy_top1": float(cumulative[0]),
            "norm": float(squares.sum().sqrt())}
