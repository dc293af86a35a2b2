"""The result of one run: what `result.json` holds, what a study stores, what `run` prints and analysis reads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SAMPLES_FILE = "samples.jsonl"  # a run's generated completions (instruction tasks with eval.generate)


@dataclass
class RunResult:
    status: str  # done | failed
    error: str | None = None  # why it failed
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metric -> value
    cost: dict[str, Any] = field(default_factory=dict)  # parameters, time, tokens, memory, sizes, latency
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
        return asdict(self)

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
        return cls(**{k: v for k, v in {**data, "cost": cost, "speed": speed}.items() if k in known})


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
