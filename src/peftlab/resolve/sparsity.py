"""`peftlab sparsity`: SparseLoRA's sensitivity profile of a model on a task, as a run with
`sparsity: auto(...)` measures it (the same batches, estimator and cache), and the allocations it gives."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.files import write_atomic
from peftlab.methods.registry import make_method
from peftlab.methods.sparselora.profile import Allocation, SparsityProfile, choose_levels
from peftlab.models.load import head_modules, load_model
from peftlab.specs import RunConfig
from peftlab.train.phases import initial_batches

BUDGETS = (0.005, 0.01, 0.02, 0.05)  # loss budgets the command shows allocations for


def sparsity_profile(config: RunConfig) -> tuple[SparsityProfile, dict[float, Allocation]]:
    """The profile of `config`'s model on its task (its method: sparselora with `sparsity: auto`), and the
    allocation each of `BUDGETS` (and the method's own budget) gives."""
    from peftlab.resolve.run import resolve_run

    auto = getattr(config.method, "sparsity", None)
    if config.method.name != "sparselora" or auto is None:
        raise PeftlabError("peftlab sparsity: the method must be sparselora with sparsity: auto(...)")
    run = resolve_run(config)
    model = load_model(run.model, seed=config.train.seed)
    method = make_method(run.method, run.total_steps)
    model = method.apply(model, run.plan, head_modules(model))
    if not method.blocks:
        raise PeftlabError(f"peftlab sparsity: the plan leaves no FFN or attention block of {config.model.name} "
                           "that SparseLoRA can sparsify (it needs a layer's up and down, or q, k, v and o)")
    # the batches a run of this config profiles on, so that the run reads this profile from the cache
    chosen = method.profile_batches(initial_batches(run.data.train, config.train.batch_size, run.pad_id))
    profile = method.profile(model, chosen, run.data.kind)
    budgets = sorted({*BUDGETS, auto.loss_budget} - {0.0})
    return profile, {budget: choose_levels(profile, budget) for budget in budgets}


def write_profile(profile: SparsityProfile, allocations: dict[float, Allocation], model: str, folder: Path) -> list[Path]:
    """`sparsity.json` (the profile, what its increases measure, and the allocations) and `sparsity.csv` (one row
    per block and level)."""
    record: dict[str, Any] = {"model": model, **profile.to_dict(),
                              "allocations": {f"{b:g}": vars(a) for b, a in allocations.items()}}
    json_path, csv_path = folder / "sparsity.json", folder / "sparsity.csv"
    write_atomic(json_path, json.dumps(record, indent=1) + "\n")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["layer", "block", "level", "increase", "output_error", "flops_saved"])  # increase: `measure`
    for b in profile.blocks:
        for level, increase, error, saving in zip(profile.levels, b.increase, b.output_error, b.saving):
            writer.writerow([b.layer, b.block, level, f"{increase:.6g}", f"{error:.6g}", f"{saving:.6g}"])
    write_atomic(csv_path, text.getvalue())
    return [json_path, csv_path]
