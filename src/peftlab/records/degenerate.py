"""Degenerate runs: runs that finished but learned nothing a study should compare.

A classifier that predicts one class, or whose accuracy a majority-class guess matches within sampling
noise, or a regression that predicts one value, measures the learning rate's failure, not the configuration. A causal LM whose test loss is not
below the base model's learned nothing. Such runs are named in `study status` and the report, and can
be left out of the statistics (`peftlab report --exclude-degenerate`).
"""

from __future__ import annotations

import math
from typing import Any

NOISE_Z = 1.96  # a two-sided 95% band around the majority rate
BASE_TOLERANCE = 1e-3  # a test loss within 0.1% of the base model's is no gain
BENCHMARK = "benchmark"  # how the reasons that concern a benchmark begin


def degenerate_reason(row: dict[str, Any], split: str = "test", benchmark: str | None = None) -> str | None:
    """Why a finished run (a flat study row) is degenerate on `split` (and, for a study judged by a benchmark task,
    on `benchmark`: one answer to every question, or an accuracy within noise of always giving the commonest
    right answer), or None. Rows from runs that did not record the needed figures (older peftlab versions) are
    never flagged."""
    if benchmark is not None and (reason := _benchmark_reason(row, benchmark)):
        return reason
    if reason := collapse_reason(row, split):
        return reason
    accuracy, majority, count = (row.get(f"metrics.{split}.{k}") for k in ("accuracy", "majority_rate", "count"))
    if (band := _noise_band(accuracy, majority, count)) is not None:
        return f"accuracy {accuracy:.3f} within noise of the majority class ({majority:.3f} ± {band:.3f})"
    return None


def collapse_reason(row: dict[str, Any], split: str = "test") -> str | None:
    """The degenerate reasons that are facts about a run rather than statistical findings: one predicted class or
    value, a diverged loss, a loss not below the base model's (an accuracy within noise of the majority class is
    not one: on a small split a run that learned a little can look like it); None otherwise."""
    if row.get(f"metrics.{split}.predicted_classes") == 1:
        return "predicts a single class"
    if row.get(f"metrics.{split}.predicted_values") == 1:
        return "predicts a single value"
    loss, base = row.get(f"metrics.{split}.loss"), row.get(f"metrics.{split}.base_loss")
    if _number(loss) and not math.isfinite(loss):
        return f"diverged (non-finite {split} loss)"
    if _number(loss) and _number(base) and loss > base * (1 - BASE_TOLERANCE):
        return f"{split} loss {loss:.4f} not below the base model's {base:.4f} (by more than 0.1%)"
    return None


def _benchmark_reason(row: dict[str, Any], task: str) -> str | None:
    prefix = f"metrics.benchmarks.{task}."
    if row.get(prefix + "predicted_choices") == 1:
        return f"{BENCHMARK} {task}: gives one answer to every question"
    accuracy, majority, count = (row.get(prefix + k) for k in ("acc", "majority_rate", "count"))
    if (band := _noise_band(accuracy, majority, count)) is not None:
        return (f"{BENCHMARK} {task}: accuracy {accuracy:.3f} within noise of always giving its commonest right "
                f"answer ({majority:.3f} ± {band:.3f})")
    return None


def _noise_band(accuracy: Any, majority: Any, count: Any) -> float | None:
    """The two-sided 95% band around the majority rate when `accuracy` lies within it (a trivial answerer's
    score); None otherwise, or where a figure is missing."""
    if not (_number(accuracy) and _number(majority) and _number(count) and count > 0):
        return None
    band = NOISE_Z * math.sqrt(majority * (1 - majority) / count)
    return band if accuracy <= majority + band else None


def blind(reasons: Any) -> bool:
    """Whether every one of these degenerate reasons concerns a benchmark (the runs trained, but answer it blindly)."""
    reasons = list(reasons)
    return bool(reasons) and all(r.startswith(BENCHMARK) for r in reasons)


def checkable(row: dict[str, Any]) -> bool:
    """Whether a run recorded what `degenerate_reason` reads (runs of older peftlab versions did not)."""
    return any(_number(row.get(f"metrics.test.{k}")) for k in ("predicted_classes", "predicted_values", "majority_rate",
                                                              "base_loss"))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
