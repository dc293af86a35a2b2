"""What peftlab measures, declared once: every metric a run reports and every cost a study can be judged by.

The analysis (direction, equivalence margin), the report (labels, secondary columns, formats), the figures
and the command-line help and tables read these records; a new metric or cost is one record here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # as in result.json: metrics.<split>.<name>
    label: str  # as tables and help show it
    higher_is_better: bool
    margin: float | None = None
    """Equivalence margin in the metric's units; None: RELATIVE_MARGIN of the baseline's mean."""
    secondary: bool = False
    """Shown beside a study's quality metric where every configuration has it."""
    quality: bool = True
    """Listed as a test-split quality metric in `--metric`'s help (which also takes any dotted column)."""


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", True, 0.01),
    Metric("macro_f1", "macro F1", True, 0.01),
    Metric("mcc", "Matthews correlation", True, 0.01),  # CoLA's metric; 0 for a classifier of one class
    Metric("f1", "F1", True, 0.01),  # binary, of the second class (MRPC, QQP)
    Metric("pearson", "Pearson r", True, 0.01),  # regression (STS-B)
    Metric("spearman", "Spearman rho", True, 0.01),
    Metric("loss", "loss", False, 0.02),
    Metric("perplexity", "perplexity", False, secondary=True),
    Metric("rouge_l", "ROUGE-L", True, 0.01, secondary=True),
    Metric("exact_match", "exact match", True, 0.01, secondary=True),
    Metric("increase", "loss increase", False, quality=False),  # metrics.forgetting.increase: over the base's loss
    Metric("base_loss", "base model loss", False, quality=False),
    Metric("base_rouge_l", "base model ROUGE-L", True, quality=False),
    Metric("base_exact_match", "base model exact match", True, quality=False),
    Metric("mean_new_tokens", "tokens per completion", True, quality=False),
    Metric("generated", "completions", True, quality=False),
    Metric("majority_rate", "majority-class share", True, quality=False),  # the accuracy of always one class
    Metric("predicted_classes", "classes predicted", True, quality=False),
    Metric("predicted_values", "distinct values predicted", True, quality=False),  # a regression's
    # lm-evaluation-harness' (metrics.benchmarks.<task>.<name>): its other names default to higher is better
    Metric("acc", "accuracy", True, 0.01, quality=False),
    Metric("acc_norm", "length-normalized accuracy", True, 0.01, quality=False),
    Metric("bits_per_byte", "bits per byte", False, quality=False),
)
BY_NAME = {metric.name: metric for metric in METRICS}
RELATIVE_MARGIN = 0.02  # of the baseline's mean, for a metric without a margin of its own (perplexity)


def metric(name: str) -> Metric | None:
    """The record of a metric given by name or dotted column (`metrics.test.rouge_l`); None for one peftlab does
    not declare (a column of an older or newer result file)."""
    return BY_NAME.get(name.rsplit(".", 1)[-1])


def higher_is_better(name: str) -> bool:
    """Of a declared metric, its record's direction; of another, lower is better where it names a loss."""
    known = metric(name)
    return known.higher_is_better if known else not name.endswith(("loss", "perplexity"))


def label(name: str) -> str:
    known = metric(name)
    return known.label if known else name.rsplit(".", 1)[-1].replace("_", " ")


def default_margin(name: str, baseline_mean: float) -> float:
    """The equivalence margin when neither the study nor the command gives one."""
    known = metric(name)
    if known and known.margin:
        return known.margin
    return RELATIVE_MARGIN * abs(baseline_mean) or BY_NAME["loss"].margin


def quality_names() -> list[str]:
    return [m.name for m in METRICS if m.quality]


@dataclass(frozen=True)
class Cost:
    name: str  # as `--cost` takes it
    column: str  # as in result.json: cost.<column>
    label: str  # in sentences: "the frontier of quality vs training time"
    unit: str  # on an axis and in a budget bracket
    kind: str  # how a value is written: count, seconds or bytes
    tabled: bool = False  # a column of the report's main table

    @property
    def title(self) -> str:
        """The table column's: the label with the unit its cells are in."""
        symbol = {"bytes": "MiB", "seconds": "s"}.get(self.kind)
        return f"{self.label} ({symbol})" if symbol else self.label

    def cell(self, value: float) -> str:
        """A value in a table cell, in the title's unit."""
        if self.kind == "bytes":
            return f"{value / 2**20:,.0f}"
        return f"{value:.1f}" if self.kind == "seconds" else f"{value:,.0f}"

    def format(self, value: float) -> str:
        if self.kind == "bytes":
            return f"{value / 2**20:,.1f} MiB"
        if self.kind == "seconds":
            return f"{value:,.1f} s"
        return f"{value:,.0f}"


COSTS: tuple[Cost, ...] = (
    Cost("trainable", "trainable_params", "trainable parameters", "trainable params", "count"),
    Cost("time", "train_seconds", "training time", "training seconds", "seconds", tabled=True),
    Cost("memory", "peak_memory_bytes", "peak memory", "peak memory", "bytes", tabled=True),
    Cost("size", "adapter_bytes", "adapter size", "adapter size", "bytes"),
)
COST_BY_NAME = {cost.name: cost for cost in COSTS}


def format_p(p: float) -> str:
    """A p-value as the report and the recommendations write it."""
    return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
