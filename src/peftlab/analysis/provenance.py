"""The report's provenance: what someone needs to reproduce a study, read from what its runs recorded."""

from __future__ import annotations

from collections import Counter
from typing import Any

from peftlab.provenance import PACKAGES


def provenance_lines(runs: list[dict[str, Any]]) -> list[str]:
    """peftlab's version(s), the packages, the device, and each input's identity, over the compared runs
    (flat rows); where runs differ, each value with its count."""
    recorded = [r for r in runs if r.get("environment.versions.peftlab.version")]
    lines = []
    if len(recorded) < len(runs):
        lines.append(f"{len(runs) - len(recorded)} of {len(runs)} runs come from an older peftlab that recorded "
                     "neither its version nor its inputs' fingerprints: their inputs could not be checked.")
    if not recorded:
        return lines
    versions = Counter(r["environment.versions.peftlab.version"] + (
        f" (commit {r['environment.versions.peftlab.commit']})" if r.get("environment.versions.peftlab.commit") else "")
        for r in recorded)
    lines.append(f"peftlab {_listed(versions)}." + (" The runs come from different peftlab versions: a difference "
                                                    "between configurations may partly be one between versions."
                                                    if len(versions) > 1 else ""))
    packages = [f"{name} {_counted(recorded, lambda r, n=name: str(r.get(f'environment.versions.{n}')))}"
                for name in PACKAGES if any(r.get(f"environment.versions.{name}") for r in recorded)]
    lines.append("Packages: " + ", ".join(packages) + ".")
    lines.append("Device: " + _counted(recorded, _device) + ".")
    lines.append("Arithmetic: " + _counted(recorded, _arithmetic) + ".")
    fields = sorted({k.removeprefix("inputs.") for r in recorded for k in r if k.startswith("inputs.")})
    for field in fields:
        lines.append(f"Input {field}: {_counted(recorded, lambda r, f=field: str(r.get(f'inputs.{f}')))}.")
    return lines


def _device(row: dict[str, Any]) -> str:
    device = str(row.get("environment.device"))
    if row.get("environment.gpu"):
        device += f" ({row['environment.gpu']}, CUDA {row.get('environment.cuda')}, driver {row.get('environment.driver')})"
    return f"{device}, {row.get('environment.threads')} threads on {row.get('environment.cpus')} CPUs"


def _arithmetic(row: dict[str, Any]) -> str:
    """The precision and attention kernels a run computed with (runs of an older peftlab recorded no kernel)."""
    precision = row.get("environment.mixed_precision")
    text = "fp32" if precision in (None, "no") else f"{precision} autocast"
    training, forward = row.get("environment.attn_implementation"), row.get("environment.attn_implementation_forward")
    if training is None:
        return text + ", attention kernel not recorded"
    if forward in (None, training):
        return f"{text}, {training} attention"
    return f"{text}, {training} attention in training and {forward} in evaluation and generation"


def _counted(rows: list[dict[str, Any]], value) -> str:
    """The one value all rows share, or each value with its count of runs."""
    return _listed(Counter(value(r) for r in rows))


def _listed(counts: Counter) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} runs)" for v, n in counts.most_common())
