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
from peftlab.methods.registry import make_method
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
    method = make_method(config.method)
    if method.size_parameter == "rank":
        return config.model_copy(update={"plan": config.plan.model_copy(update={"allocation": UniformAllocation(rank=size)})})
    if method.size_parameter is None:
        return config
    return config.model_copy(update={"method": method.sized_spec(size)})


def match_budget(config: RunConfig, model: ModelSpec, budget: int) -> tuple[RunConfig, BudgetMatch]:
    """The config whose method size comes closest to `budget` trainable parameters (ties: the smaller)."""
    method = make_method(config.method)
    parameter = method.size_parameter
    if parameter is None:  # full fine-tuning and BitFit train what the model has
        return config, BudgetMatch(budget, None, None, method_params(config, model))
    sizes = method.size_candidates(plan_on(model, config.plan, build_skeleton(model))) or range(1, MAX_SIZE + 1)
    if not sizes:
        raise PeftlabError(f"budget: method {method.label} has no valid {parameter} on this plan")
    counts: dict[int, int | None] = {}

    def count(index: int) -> int | None:
        """Parameters at the `index`-th size; None where the size is invalid (a rank above min(in, out))."""
        size = sizes[index]
        if size not in counts:
            try:
                counts[size] = method_params(with_size(config, size), model)
            except PeftlabError:
                if index == 0:  # not about the size (a plan without the method's roles, ...)
                    raise
                counts[size] = None
        return counts[size]

    def reaches(index: int) -> bool:  # monotone: invalid sizes lie above every valid one
        value = count(index)
        return value is None or value >= budget

    low, high = -1, 0  # indices into sizes: not reaches(low) (the size before the first, taken as 0), reaches(high)
    while not reaches(high):
        if high >= len(sizes) - 1:
            break
        low, high = high, min(2 * high + 1, len(sizes) - 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if not reaches(middle) else (low, middle)
    if count(high) is None or count(high) < budget:  # the largest valid size falls short
        if low < 0:
            raise PeftlabError(f"budget: method {method.label} has no valid {parameter} on this plan")
        raise PeftlabError(f"budget: {budget:,} parameters is out of reach for method {method.label} on this "
                           f"plan (at most {count(low):,}, with {parameter} {sizes[low]}); lower the budget")
    if high == 0 and count(0) > 2 * budget:  # "closest" would more than double what was asked for
        raise PeftlabError(f"budget: {budget:,} parameters is below the smallest {method.label} on this plan "
                           f"({count(0):,}, with {parameter} {sizes[0]}); raise the budget or adapt fewer sites")
    index = low if low >= 0 and budget - count(low) <= count(high) - budget else high
    return with_size(config, sizes[index]), BudgetMatch(budget, parameter, sizes[index], count(index))
