"""Run ids are stable: every shipped study's ids equal the recorded ones (a changed id reruns every stored run of
that study), and the fields marked in the specs (`peftlab.fields`) stay out of ids where they should."""

import json
from pathlib import Path

import pytest

from peftlab.config import load_spec
from peftlab.specs import StudySpec
from peftlab.studies.grid import configurations, expand
from peftlab.studies.shipped import shipped_studies

GOLDEN = Path(__file__).parent / "golden" / "shipped_run_ids.json"


def shipped_run_ids() -> dict[str, list[str]]:
    """Per shipped study, the ids of its tuning runs and of its seed runs at a chosen point."""
    ids = {}
    for name, path in sorted(shipped_studies().items()):
        spec = load_spec(StudySpec, path)
        chosen = {c.label: (1e-3,) for c in configurations(spec)}  # a point: the rate (no shipped study tunes a grid)
        ids[name] = sorted({r.id for r in expand(spec)} | {r.id for r in expand(spec, chosen)})
    return ids


def test_shipped_studies_keep_their_run_ids():
    # regenerate only for a change meant to rerun stored studies:
    # (cd tests && python -c "import json, test_run_ids as t; print(json.dumps(t.shipped_run_ids(), indent=1, sort_keys=True))")
    assert shipped_run_ids() == json.loads(GOLDEN.read_text())


def one_run_id(**base) -> str:
    spec = StudySpec.model_validate({"name": "ids", "seeds": [0], "base": {"model": "tiny-llama", **base},
                                     "axes": {}})
    (run,) = expand(spec)
    return run.id


@pytest.mark.parametrize("setting", [
    {"tracking": ["tensorboard"]},
    {"train": {"checkpoint_every": 5, "gradient_checkpointing": True, "eval_at": [0.3], "sharding": "fsdp"}},
    {"train": {"device": "auto"}},  # added with its default
    {"method": {"name": "lora", "init": "default"}},
    {"method": {"name": "sparselora", "sparsity": None}},
])
def test_marked_fields_stay_out_of_run_ids(setting):
    plain = {"method": {"name": setting["method"]["name"]}} if "method" in setting else {}
    assert one_run_id(**setting) == one_run_id(**plain)


@pytest.mark.parametrize("setting", [{"train": {"device": "cpu"}}, {"method": {"name": "lora", "init": "gaussian"}},
                                     {"train": {"lr": 1e-3}}])
def test_learned_fields_change_run_ids(setting):
    assert one_run_id(**setting) != one_run_id()
