"""Seeds until resolved: after the first seeds, add seeds in rounds, only to configurations whose comparison
with the baseline is still unresolved, up to a maximum.

Testing after every round and stopping at the first significant result inflates false positives. The looks
are fixed in advance (the first seeds, then every `step` more up to `max`), and each comparison is judged
by its sequential p-value over those looks (`analysis.sequential`), Holm-corrected across the comparisons:
a study with no true difference declares one at any look with probability at most alpha, whenever it
stops. Equivalence is a second family with the same guarantee at the margin: sequential TOST p-values,
Holm-corrected. `tests/test_adaptive.py` checks both by simulating thousands of such studies. An unresolved
comparison with almost no chance of resolving by the maximum gets no more seeds (`analysis.futility`).
"""

from __future__ import annotations

from pathlib import Path

from peftlab.analysis.futility import FUTILE, paired_differences, with_futility
from peftlab.analysis.sequential import Design
from peftlab.analysis.stats import Verdict, compare, judge
from peftlab.errors import PeftlabError
from peftlab.records.results import Snapshot
from peftlab.specs import StudySpec


def next_counts(quality: dict[str, dict[int, float]], baseline: str, verdicts: dict[str, str], spec: StudySpec,
                have: dict[str, int] | None = None) -> dict[str, int]:
    """Label -> the seeds it should have after this look (`verdicts`: each comparison's outcome at this
    look, from `outcomes`; `have`: the seeds each already has, failed ones included, default the finished
    ones). A configuration whose comparison is unresolved (not futile) and below the maximum gets `step` more;
    the baseline gets as many as the most-seeded configuration, so every comparison stays paired."""
    rounds = spec.until_resolved
    counts = {label: len(values) for label, values in quality.items()}
    counts.update({label: n for label, n in (have or {}).items() if label in counts})
    for label, verdict in verdicts.items():
        if verdict == "unresolved" and counts[label] < rounds.max:
            counts[label] = min(rounds.max, counts[label] + rounds.step)
    counts[baseline] = max(counts.values())
    return counts


def outcomes(quality: dict[str, dict[int, float]], baseline: str, margin: float, higher_is_better: bool,
             design: Design) -> dict[str, str]:
    """Label -> better | worse | equivalent | unresolved | futile (unresolved, no more seeds) against the baseline
    at this look."""
    others = [label for label in quality if label != baseline]
    comparisons = [compare(quality[label], quality[baseline]) for label in others]
    verdicts = judge(comparisons, margin, higher_is_better, design, False)
    return {label: outcome(with_futility(v, paired_differences(quality[label], quality[baseline]), design))
            for label, v in zip(others, verdicts)}


def outcome(verdict: Verdict) -> str:
    """A verdict's outcome as the seeding reads it: a futile unresolved comparison is `futile`."""
    return FUTILE if verdict.futility is not None else verdict.outcome


def seed_counts(spec: StudySpec, snapshot: Snapshot, study_dir: Path) -> dict[str, int] | None:
    """Label -> the seeds each configuration should have, decided from the stored runs at this look (the
    analysis' verdicts, `verdicts_only`); None when there is nothing to decide (not an adaptive study, or runs
    still to finish)."""
    from peftlab.analysis.analyze import analyze_snapshot

    rows = [r for r in snapshot.rows if r["phase"] == "main"]
    # a look needs every configuration's seed runs of this round: none may wait (tuning runs included)
    if spec.until_resolved is None or not rows or any(r["status"] in ("pending", "running") for r in snapshot.rows):
        return None
    try:
        analysis = analyze_snapshot(snapshot, spec.model_dump(mode="json", exclude_none=True), study_dir,
                                    verdicts_only=True)
    except PeftlabError:  # no finished seed run yet
        return None
    have: dict[str, int] = {}
    for row in rows:  # the label's current configuration only (an edited spec's earlier runs stay in the store)
        if row["group"] == snapshot.current.get(row["label"]):
            have[row["label"]] = have.get(row["label"], 0) + 1
    quality = {c.label: c.quality for c in analysis.configurations}
    # the analysis' verdicts: a configuration that did not train (every run degenerate) gets no more seeds
    verdicts = {c.label: outcome(c.verdict) for c in analysis.configurations if c.verdict}
    return next_counts(quality, analysis.baseline.label, verdicts, spec, have)

