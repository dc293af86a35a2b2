"""What `resolve_run` decides before a run trains: the type the run's phases (`peftlab.train.run`) read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftlab.methods.specs import MethodSpec
    from peftlab.plans.plan import Plan
    from peftlab.resolve.budget import BudgetMatch
    from peftlab.specs import ModelSpec, RunConfig
    from peftlab.tasks.prepare import TaskData
    from peftlab.train.generation import Prompts


@dataclass(frozen=True)
class ResolvedRun:
    """Everything a run decided before it trains."""

    config: RunConfig  # as given: saved with the run
    model: ModelSpec  # with the task's head
    method: MethodSpec  # with its size chosen where a budget is matched
    plan: Plan
    data: TaskData  # tokenized
    pad_id: int
    total_steps: int
    budget: BudgetMatch | None = None
    scores: Path | None = None  # the importance scores the ranks came from
    tokenizer: Any = None  # decodes generated completions
    prompts: Prompts | None = None  # test prompts to complete (eval.generate)
    forgetting: list[dict[str, Any]] | None = None  # a general text's chunks (eval.forgetting)
    inputs: dict[str, str] = field(default_factory=dict)  # identity of every input, taken before any was read
