"""One run over several processes (`accelerate launch -m peftlab run`): two CPU processes on gloo learn what one
process learns with the same global batch, gather the same metrics, and only the main process writes."""

import json
from pathlib import Path

import pytest
import torch
from conftest import color_instructions, launch
from safetensors.torch import load_file

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.specs import RunConfig


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return config


def close(single: dict, parallel: dict) -> None:
    for split, metrics in single["metrics"].items():
        for name, value in metrics.items():
            assert parallel["metrics"][split][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (split, name)
    assert parallel["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-5)
    assert parallel["cost"]["train_tokens"] == single["cost"]["train_tokens"]  # every example, once per epoch
    assert (single["environment"]["processes"], parallel["environment"]["processes"]) == (1, 2)


@pytest.mark.parametrize("kind", ["classification", "instruction"])
def test_two_processes_learn_what_one_does_with_the_same_global_batch(kind, tmp_path, reviews_file, private_cache,
                                                                       cli):
    if kind == "classification":  # 120 reviews: 86 train; batches of 5 leave a last batch of 1, for which the
        # second process has no row and runs the first with weight 0 (unclipped, so that a wrong weight would show)
        text = (f"model: {{name: tiny-bert, dropout: 0.0}}\ntask: {{path: {reviews_file}, kind: classification}}\n"
                "plan: {placement: all, allocation: 4}\n"
                "train: {epochs: 2, batch_size: 5, lr: 0.01, precision: fp32, latency_batches: 1, device: cpu, "
                "max_grad_norm: 1000}\n")
    else:  # token-weighted losses: shards hold different token counts; two micro-batches per step
        data = color_instructions(tmp_path)
        text = (f"model: tiny-llama\ntask: {{path: {data}, kind: instruction}}\nplan: {{placement: all, allocation: 4}}\n"
                "train: {max_steps: 6, batch_size: 5, grad_accum: 2, lr: 0.01, precision: fp32, latency_batches: 1, "
                "device: cpu}\n")
    config = write_config(tmp_path, text)
    code, _, err = cli("run", "-c", config, "--output", tmp_path / "single")
    assert code == 0, err
    before = set(tmp_path.iterdir())
    launched = launch(config, tmp_path / "parallel", 2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert set(tmp_path.iterdir()) - before == {tmp_path / "parallel"}  # the other process wrote nothing here
    assert launched.stdout.count("result: ") == 1  # one report, from the main process
    single, parallel = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("single", "parallel"))
    close(single, parallel)
    weights = [load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("single", "parallel")]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():  # the trained weights themselves, not only metrics that move little
        assert torch.allclose(weights[1][name], tensor, rtol=1e-3, atol=2e-5), name


def test_training_checkpoints_are_refused_over_several_processes(monkeypatch, tmp_path, reviews_file):
    from peftlab.resolve.run import resolve_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = validate(RunConfig, {"model": "tiny-bert", "task": {"path": str(reviews_file), "kind": "classification"},
                                  "train": {"checkpoint_every": 2}}, "test")
    with pytest.raises(PeftlabError, match="checkpoint_every: not available for a run over several processes"):
        resolve_run(config)


def test_a_study_run_over_several_processes_is_stored_like_one_in_one_process(tmp_path, reviews_file, private_cache):
    """What a Ray task holding two GPUs runs (here two CPU processes): the run under torchrun, its result read
    back as the study's worker reads a run's result."""
    from peftlab.studies.executors import processes_per_run
    from peftlab.studies.worker import execute_parallel_study_run, execute_study_run

    config = validate(RunConfig, {"model": {"name": "tiny-bert", "dropout": 0.0},
                                  "task": {"path": str(reviews_file), "kind": "classification"},
                                  "train": {"max_steps": 4, "batch_size": 8, "precision": "fp32", "device": "cpu",
                                            "latency_batches": 0}}, "test").model_dump(mode="json", by_alias=True)
    study = tmp_path / "study"
    single = execute_study_run(study, "one", config, threads=1)
    parallel = execute_parallel_study_run(study, "two", config, threads=2, processes=2)
    assert single[0] == parallel[0] == "done" and parallel[2] is None
    for split, metrics in single[1]["metrics"].items():
        for name, value in metrics.items():
            assert parallel[1]["metrics"][split][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (split, name)
    assert sorted(p.name for p in (study / "runs").iterdir()) == ["one", "two"]
    assert [processes_per_run(g) for g in (0, 0.5, 1, 2, 4)] == [1, 1, 1, 2, 4]
    with pytest.raises(PeftlabError, match="--gpus-per-run 1.5: above 1 it is the number of GPUs"):
        processes_per_run(1.5)
