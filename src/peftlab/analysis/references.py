"""Published results beside a study's own: for each configuration with a `references:` entry, its mean and
interval next to the published value, and whether its mean lies within the published interval."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftlab import measures

if TYPE_CHECKING:
    from peftlab.analysis.analyze import Analysis

HEADER = ["configuration", "metric", "this study (mean, 95% CI)", "published", "source", "this study vs published"]


@dataclass(frozen=True)
class ReferenceRow:
    label: str
    metric: str  # the column, e.g. metrics.test.accuracy
    ours: str
    published: str
    source: str
    placement: str  # within | above | below the published interval, or why it cannot be said

    def cells(self) -> list[str]:
        return [self.label, measures.label(self.metric), self.ours, self.published, self.source, self.placement]


def reference_rows(analysis: Analysis, references: dict[str, dict[str, Any]]) -> list[ReferenceRow]:
    """One row per reference (`StudySpec.references`, as study.yaml holds them)."""
    from peftlab.specs import Reference

    by_label = {c.label: c for c in analysis.configurations}
    rows = []
    for label, given in references.items():
        reference = Reference.model_validate(given)
        metric = analysis.metric if not reference.metric else (
            reference.metric if reference.metric.startswith("metrics.") else f"metrics.test.{reference.metric}")
        configuration = by_label.get(label)
        summary = None if configuration is None else (
            configuration.summary if metric == analysis.metric else configuration.every_metric.get(metric))
        ours = "no such configuration in this study" if configuration is None else (
            "not measured" if summary is None or not summary.n else _ours(summary))
        rows.append(ReferenceRow(label, metric, ours, _published(reference), reference.source,
                                 _placement(summary, reference.bounds)))
    return rows


def _ours(summary) -> str:
    interval = f" [{summary.low:.4f}, {summary.high:.4f}]" if summary.n > 1 else ""
    return f"{summary.mean:.4f}{interval} (n={summary.n})"


def _published(reference) -> str:
    spread = f" ± {reference.spread:g}" if reference.spread is not None else ""
    interval = f" [{reference.interval[0]:g}, {reference.interval[1]:g}]" if reference.interval is not None else ""
    runs = f" (n={reference.n})" if reference.n else ""
    return f"{reference.value:g}{spread}{interval}{runs}"


def _placement(summary, bounds: tuple[float, float] | None) -> str:
    if summary is None or not summary.n or math.isnan(summary.mean):
        return "-"
    if bounds is None:
        return "no published interval"
    low, high = bounds
    if summary.mean < low:
        return f"below ({summary.mean - low:+.4f})"
    if summary.mean > high:
        return f"above ({summary.mean - high:+.4f})"
    return "within"
