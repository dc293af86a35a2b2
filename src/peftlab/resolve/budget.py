"""Equal-budget comparisons: choose each method's size parameter (rank, bottleneck width, prefix length)
so that its trainable parameters come closest to a budget.

Counts come from applying the method to the model's skeleton on the meta device, so every method's
own extras are included (DoRA's magnitudes, AdaLoRA's singular values, the bottleneck biases, the
prefix per layer) without a formula per method. Rank methods get a uniform rank over the plan's
placement; the task head is not part of the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.methods.registry import METHODS, make_method
from peftlab.models.load import build_skeleton, head_modules
from peftlab.plans.allocation import UniformAllocation
from peftlab.plans.plan import plan_on
from peftlab.specs import ModelSpec, RunConfig

MAX_SIZE = 4096


@dataclass(frozen=True)
class BudgetMatch:
    target: int
    parameter: str | None  # "rank", "num_virtual_tokens", or None when the method has no size
    size: int | None
    params: int  # the method's trainable parameters at that size (head excluded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_params(config: RunConfig, model: ModelSpec) -> int:
    """Trainable parameters of `config`'s method and plan on `model` (head excluded), on the meta device."""
    skeleton = build_skeleton(model)
    plan = plan_on(model, config.plan, skeleton)
    return make_method(config.method, total_steps=100).trainable_for(skeleton, plan, head_modules(skeleton))


def with_size(config: RunConfig, size: int) -> RunConfig:
    """`config` with its method's size parameter set to `size`."""
    parameter = METHODS[config.method.name].size_parameter
    if parameter == "rank":
        return config.model_copy(update={"plan": config.plan.model_copy(update={"allocation": UniformAllocation(rank=size)})})
    if parameter is None:
        return config
    return config.model_copy(update={"method": config.method.model_copy(update={parameter: size})})


def match_budget(config: RunConfig, model: ModelSpec, budget: int) -> tuple[RunConfig, BudgetMatch]:
    """The config whose method size comes closest to `budget` trainable parameters (ties: the smaller)."""
    parameter = METHODS[config.method.name].size_parameter
    if parameter is None:  # full fine-tuning and BitFit train what the model has
        return config, BudgetMatch(budget, None, None, method_params(config, model))
    counts: dict[int, int | None] = {}

    def count(size: int) -> int | None:
        """Parameters at `size`; None where the size is invalid (a rank above min(in, out))."""
        if size not in counts:
            try:
                counts[size] = method_params(with_size(config, size), model)
            except PeftlabError:
                if size == 1:  # not about the size (a plan without the method's roles, ...)
                    raise
                counts[size] = None
        return counts[size]

    def reaches(size: int) -> bool:  # monotone: invalid sizes lie above every valid one
        value = count(size)
        return value is None or value >= budget

    low, high = 0, 1  # not reaches(low) (count(0) taken as 0), reaches(high)
    while not reaches(high):
        if high >= MAX_SIZE:
            break
        low, high = high, min(2 * high, MAX_SIZE)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if not reaches(middle) else (low, middle)
    if count(high) is None or count(high) < budget:  # the largest valid size falls short
        if low < 1:
            raise PeftlabError(f"budget: method {config.method.name} has no valid {parameter} on this plan")
        raise PeftlabError(f"budget: {budget:,} parameters is out of reach for method {config.method.name} on this "
                           f"plan (at most {count(low):,}, with {parameter} {low}); lower the budget")
    if high == 1 and count(1) > 2 * budget:  # "closest" would more than double what was asked for
        raise PeftlabError(f"budget: {budget:,} parameters is below the smallest {config.method.name} on this plan "
                           f"({count(1):,}, with {parameter} 1); raise the budget or adapt fewer sites")
    size = low if low >= 1 and budget - count(low) <= count(high) - budget else high
    return with_size(config, size), BudgetMatch(budget, parameter, size, count(size))
