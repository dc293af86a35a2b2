"""The result of one run: what `result.json` holds, what a study stores, what `run` prints and analysis reads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

SAMPLES_FILE = "samples.jsonl"  # a run's generated completions (instruction tasks with eval.generate)


@dataclass
class Costs:
    """result.json's `cost`: what a run cost. Every field is written (the generation ones only where the run
    generated); keys of other peftlab versions' files are kept as read, in `other`."""

    trainable_params: int | None = None  # the method's own and the task head's
    adapter_params: int | None = None
    head_params: int | None = None
    plan_params: int | None = None  # the plan's count where the method's parameters are a sum over its sites
    base_params: int | None = None
    total_params: int | None = None
    trainable_share: float | None = None  # of the total
    steps: int | None = None  # optimizer steps trained (a run stopped at a rung: up to there)
    planned_steps: int | None = None  # the run's whole budget
    train_seconds: float | None = None  # optimizer steps only: the same work for every seed, whichever built a cache
    importance_probe_seconds: float | None = None  # the probe the ranks came from (once per study, then cached)
    train_tokens: int | None = None
    tokens_per_second: float | None = None
    padding_fraction: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # what the peak measures (the device's allocator, or the process)
    peak_memory_process_bytes: int | None = None
    adapter_bytes: int | None = None  # on disk
    frozen_weight_bytes: int | None = None
    quantized_weight_bytes: int | None = None
    quantized_params: int | None = None
    latency_ms_per_batch: dict[str, float] = field(default_factory=dict)  # unmerged, base, merged
    latency_padded_length: float | None = None  # positions per timed example
    generation_seconds: float | None = None
    generated_tokens: int | None = None
    generation_tokens_per_second: float | None = None
    benchmark_seconds: float | None = None  # lm-evaluation-harness on the adapted model (`eval.benchmarks`)
    other: dict[str, Any] = field(default_factory=dict)

    WHERE_MEASURED: ClassVar[tuple[str, ...]] = ("generation_seconds", "generated_tokens", "generation_tokens_per_second",
                                                 "benchmark_seconds")
    """Written only where the run measured them."""

    def to_dict(self) -> dict[str, Any]:
        written = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        written = {k: v for k, v in written.items() if k not in self.WHERE_MEASURED or v is not None}
        return {**written, **self.other}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Costs:
        known = {f.name for f in fields(cls)} - {"other"}
        return cls(**{k: v for k, v in data.items() if k in known}, other={k: v for k, v in data.items() if k not in known})


@dataclass
class RunResult:
    status: str  # done | failed | stopped (at train.stop_at, to resume)
    error: str | None = None  # why it failed
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metric -> value
    cost: Costs = field(default_factory=Costs)  # parameters, time, tokens, memory, sizes, latency
    final_train_loss: float | None = None  # mean training loss over the last log window
    method: dict[str, Any] = field(default_factory=dict)  # what the method learned beyond its weights
    budget: dict[str, Any] | None = None  # the equal-budget match (target, parameter, size, params)
    speed: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # feature -> what it did (None: n/a)
    data: dict[str, Any] = field(default_factory=dict)  # split sizes, labels, task kind
    environment: dict[str, Any] = field(default_factory=dict)  # device, threads, library versions
    inputs: dict[str, str] = field(default_factory=dict)  # field -> identity of what it read (`peftlab.provenance`)
    config: dict[str, Any] | None = None  # the run config; a study stores it with the run instead

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost": self.cost.to_dict()}

    def stored(self) -> dict[str, Any]:
        """What a study's store keeps: everything but the config (the store has it): the same whether the
        worker records the run or a later study process adopts it from the run's directory."""
        return {k: v for k, v in self.to_dict().items() if k != "config"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """A result as written (result.json or a study's store), older peftlab versions' included: their
        prefix cache and last-layer-at-head records move under `speed`."""
        data = dict(data)
        cost = dict(data.get("cost") or {})
        speed = dict(data.get("speed") or {})
        if "prefix_cache" in data:
            speed.setdefault("prefix_cache", data.pop("prefix_cache"))
        if "last_layer_at_head" in cost:
            speed.setdefault("last_layer_at_head", {"used": True} if cost.pop("last_layer_at_head") else None)
        for old in ("prefix_cache_used", "prefix_cache_seconds"):
            cost.pop(old, None)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**data, "cost": Costs.from_dict(cost), "speed": speed}.items() if k in known})


def read_samples(run_dir: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` rows of a run's samples file (none when it has none): prompt, reference, the base
    model's and the adapted model's completions, and their scores."""
    path = run_dir / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if len(rows) == count:
                break
            rows.append(json.loads(line))
    return rows
