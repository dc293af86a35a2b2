"""Sharded training (`train.sharding: fsdp`): two CPU processes on gloo, each holding half of every layer block,
learn what one process learns with the same global batch, and the main process saves the full weights."""

import json
from pathlib import Path

import pytest
import torch
from conftest import color_instructions, launch
from safetensors.torch import load_file

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.specs import RunConfig
from peftlab.train import distributed
from peftlab.train.evaluate import _share


def instruction_config(tmp_path: Path) -> str:
    """LoRA on tiny LLaMA with its norms trained beside the adapters, gradient checkpointing: token-weighted losses,
    two micro-batches per step, clipping that binds, generation and merged latency (the main process alone, with
    the layers gathered)."""
    data = color_instructions(tmp_path)
    return (f"model: tiny-llama\ntask: {{path: {data}, kind: instruction}}\nplan: {{placement: all, allocation: 4, norms: true}}\n"
            "eval: {generate: {examples: 6, max_new_tokens: 4, batch_size: 4}}\n"
            "train: {max_steps: 6, batch_size: 5, grad_accum: 2, lr: 0.01, precision: fp32, latency_batches: 1, "
            "device: cpu, max_grad_norm: 0.05, eval_batch_size: 4, gradient_checkpointing: true, sharding: fsdp}\n")


def classification_config(reviews_file: Path) -> str:
    """Full fine-tuning of tiny BERT: 86 training rows in batches of 5 leave a last batch of 1 (the second process
    runs a row with weight 0), 5 evaluation batches of 4 leave the second process a batch short (it runs one
    more, not counted); the head and embeddings stay whole."""
    return (f"model: {{name: tiny-bert, dropout: 0.0}}\ntask: {{path: {reviews_file}, kind: classification}}\n"
            "method: full\n"
            "train: {epochs: 1, batch_size: 5, lr: 0.001, precision: fp32, latency_batches: 1, device: cpu, "
            "eval_batch_size: 4, sharding: fsdp}\n")


@pytest.mark.parametrize("kind", ["instruction", "classification"])
def test_two_sharded_processes_learn_what_one_does(kind, tmp_path, reviews_file, private_cache, cli):
    config = tmp_path / "config.yaml"
    config.write_text(instruction_config(tmp_path) if kind == "instruction" else classification_config(reviews_file))
    code, _, err = cli("run", "-c", config, "--output", tmp_path / "single")  # one process: nothing to shard
    assert code == 0, err
    launched = launch(config, tmp_path / "sharded", 2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    single, sharded = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("single", "sharded"))
    for split, metrics in single["metrics"].items():
        for name, value in metrics.items():
            assert sharded["metrics"][split][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, name)
    assert sharded["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-5)
    assert single["environment"]["sharding"] is None
    held = sharded["environment"]["sharding"]
    layers = 4 if kind == "instruction" else 2  # tiny LLaMA's and tiny BERT's blocks
    assert (held["kind"], held["processes"], held["units"]) == ("fsdp", 2, layers)
    # the main process holds half of every layer block (rounded up per weight) and all of the rest
    assert held["params_per_process"] - held["whole_params"] == pytest.approx(held["sharded_params"] / 2, rel=0.01)
    assert held["whole_params"] + held["sharded_params"] == single["cost"]["total_params"]
    files = ["adapter_model", "extras"] if kind == "instruction" else ["model"]
    for file in files:
        saved = [load_file(tmp_path / d / "adapter" / f"{file}.safetensors") for d in ("single", "sharded")]
        assert saved[0].keys() == saved[1].keys()  # full tensors, not shards
        for name, tensor in saved[0].items():
            assert saved[1][name].shape == tensor.shape, name
            assert torch.allclose(saved[1][name], tensor, rtol=1e-3, atol=1e-5), name
    if kind == "instruction":  # completions by the main process alone, the same tokens
        samples = [[(json.loads(line)["adapted"], json.loads(line)["base"]) for line in (tmp_path / d / "samples.jsonl").open()]
                   for d in ("single", "sharded")]
        assert samples[0] == samples[1] and len(samples[0]) == 6
        assert set(sharded["cost"]["latency_ms_per_batch"]) == {"unmerged", "merged"}


@pytest.mark.parametrize(("method", "train", "message"), [
    ({"name": "adalora"}, {}, "method adalora is not shardable"),
    ({"name": "sparselora"}, {}, "method sparselora is not shardable"),
    ({"name": "lora", "init": "eva"}, {}, "method.init eva decomposes"),
    ({"name": "lora"}, {"compile": True}, "train.compile is not available with sharded layers"),
])
def test_sharding_refuses_what_it_cannot_run_in_one_line(method, train, message, tmp_path, reviews_file):
    from peftlab.resolve.run import resolve_run

    config = validate(RunConfig, {"model": "tiny-bert", "task": {"path": str(reviews_file), "kind": "classification"},
                                  "method": method, "train": {"sharding": "fsdp", "device": "cpu", **train}}, "test")
    with pytest.raises(PeftlabError, match=message):
        resolve_run(config)


def test_the_run_command_sets_sharding_and_refuses_a_bad_value_in_one_line(tmp_path, reviews_file, cli):
    common = ["--model", "tiny-bert", "--data", reviews_file, "--kind", "classification", "--device", "cpu"]
    code, _, err = cli("run", *common, "--sharding", "halves", "--output", tmp_path / "bad")
    assert code == 2 and "train.sharding: Input should be 'none' or 'fsdp'" in err
    code, _, err = cli("run", *common, "--method", "bitfit", "--sharding", "fsdp", "--output", tmp_path / "bitfit")
    assert code == 2 and err.strip().count("\n") == 0 and "method bitfit is not shardable" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bitfit").exists()


def test_lockstep_evaluation_gives_every_process_as_many_forward_passes(monkeypatch):
    batches = [{"input_ids": torch.full((1, 1), i)} for i in range(5)]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "process_count", lambda: 2)
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "process_index", lambda rank=rank: rank)
        shares[rank] = [(int(b["input_ids"]), counted) for b, counted in _share(batches, lockstep=True)]
        assert [(int(b["input_ids"]), c) for b, c in _share(batches, lockstep=False)] == \
            [(i, True) for i in range(rank, 5, 2)]
    assert shares == {0: [(0, True), (2, True), (4, True)], 1: [(1, True), (3, True), (0, False)]}
