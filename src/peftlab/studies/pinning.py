"""A study reuses a finished run only while the inputs it read are unchanged.

Run ids hash the config, not the data it names: edit a data file, or the weights in a local model directory,
and the config, hence the id, stays the same. Each run records the identity of its inputs
(`peftlab.provenance.input_identity`); before a study runs anything, every finished run's inputs are
identified again. A change stops the study with one line naming what changed and how many runs it affects;
`--rerun-changed` runs exactly those again. Runs stored by an older peftlab recorded no identity: they are
reused, with a note that their inputs could not be checked.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.provenance import changed_inputs, input_identity
from peftlab.records.store import Store


@dataclass
class InputCheck:
    changed: dict[str, list[str]] = field(default_factory=dict)  # run id -> the fields whose inputs changed
    values: dict[str, str] = field(default_factory=dict)  # field -> the value it names, as the config gives it
    missing: set[str] = field(default_factory=set)  # fields whose file or directory is gone
    unchecked: int = 0  # finished runs that recorded no input identity (an older peftlab)

    def summary(self) -> str:
        """e.g. `task.path data.csv (changed): 4 run(s)`."""
        counts = Counter(f for fields in self.changed.values() for f in fields)
        return "; ".join(f"{f}{' ' + self.values[f] if self.values.get(f) else ''} "
                         f"({'now missing' if f in self.missing else 'changed'}): {n} run(s)"
                         for f, n in sorted(counts.items()))


def check_inputs(store: Store) -> InputCheck:
    """Identify again the inputs of every finished run and compare with what it recorded."""
    check = InputCheck()
    identities: dict[str, dict[str, str]] = {}  # a study's runs share their inputs: each identified once
    for row in store.rows():
        if row["status"] != "done" or not row["result"]:
            continue
        recorded = json.loads(row["result"]).get("inputs")
        if not recorded:
            check.unchecked += 1
            continue
        config = json.loads(row["config"])
        inputs = json.dumps({k: v for k, v in config.items() if k != "train"}, sort_keys=True)  # seeds, rates: no input
        if inputs not in identities:
            identities[inputs] = input_identity(config)
        current = identities[inputs]
        if fields := changed_inputs(recorded, current):
            check.changed[row["id"]] = fields
            check.values.update({f: _value(config, f) for f in fields})
            check.missing.update(f for f in fields if current.get(f) == "missing")
    return check


def _value(config: dict[str, Any], dotted: str) -> str:
    """What a field of the config names (model -> its name, task -> the bundled task's name)."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        value = value.get("name")
    return "" if value is None else str(value)


def enforce(store: Store, study: str, rerun_changed: bool) -> InputCheck:
    """Stop when finished runs' inputs changed (one line: what changed, how many runs); with `rerun_changed`,
    set exactly those runs to run again."""
    check = check_inputs(store)
    if check.changed and not rerun_changed:
        raise PeftlabError(f"{study}: inputs changed since {len(check.changed)} finished run(s) read them: "
                           f"{check.summary()}. Nothing was reused or run; `--rerun-changed` runs exactly those "
                           "runs again")
    for run_id in check.changed:
        store.reset(run_id)
    return check
