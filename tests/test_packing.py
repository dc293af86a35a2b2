"""Packed batches (`train.batching: packed`): one row without padding, attention confined to each example, the
same token-weighted loss and gradients as the padded batch of the same examples."""

import json

import pytest
import torch
from conftest import make_plan

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.registry import make_method
from peftlab.methods.specs import LoraSpec
from peftlab.models.load import load_model
from peftlab.specs import ModelSpec, RunConfig
from peftlab.tasks.fit import IGNORE
from peftlab.tasks.prepare import collate, collate_packed
from peftlab.train.loss import batch_nll


def examples():
    """Three prompt + response examples of different lengths (the prompt's labels ignored)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for prompt, response in ((4, 3), (9, 5), (2, 6)):
        ids = torch.randint(200, 2000, (prompt + response,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-phi3"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_a_packed_row_gives_the_padded_batch_s_loss_and_gradients(name, kernel):
    model = load_model(ModelSpec(name=name, head="causal-lm", attn_implementation=kernel), seed=0)
    model = make_method(LoraSpec()).apply(model, make_plan(name, placement="all", allocation=4), [])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 would leave A without a gradient
    model.eval()  # dropout off (GPT-2 has some): the two passes must see the same function; gradients still flow
    results = []
    for batch in (collate(examples(), pad_id=0), collate_packed(examples())):
        model.zero_grad()
        nll, count, _ = batch_nll(model, batch, "instruction")
        (nll / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((nll.item(), int(count), grads))
    (padded, padded_count, padded_grads), (packed, packed_count, packed_grads) = results
    assert packed_count == padded_count == 3 + 5 + 6 - 0  # every response token, none across a boundary
    assert packed == pytest.approx(padded, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 0
    for n in padded_grads:
        assert torch.allclose(packed_grads[n], padded_grads[n], atol=1e-6, rtol=1e-4), n


def test_attention_does_not_cross_examples_in_a_packed_row():
    """Without position ids (one long sequence) the second example would read the first: the loss differs."""
    model = load_model(ModelSpec(name="tiny-llama", head="causal-lm"), seed=0).eval()
    packed = collate_packed(examples())
    joined = {k: v for k, v in packed.items() if k != "position_ids"}
    with torch.no_grad():
        assert batch_nll(model, packed, "instruction")[0].item() != pytest.approx(
            batch_nll(model, joined, "instruction")[0].item(), rel=1e-4)
    assert packed["position_ids"].tolist() == [[*range(7), *range(14), *range(8)]]
    assert packed["labels"][0, 7].item() == IGNORE  # the token after a boundary is not predicted


def test_packed_training_learns_what_random_batches_learn(tmp_path, monkeypatch):
    """The same random batches, padded or packed: the same trained model, to float rounding."""
    from conftest import run_to_dict

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    words = ["apple", "river", "stone", "cloud"]
    rows = [{"instruction": "Repeat the word " + " ".join(words[: 1 + i % 4]) + ".", "input": "",
             "output": " ".join(words[: 1 + i % 4])} for i in range(40)]
    alpaca_file = tmp_path / "alpaca.json"
    alpaca_file.write_text(json.dumps(rows))
    results = {}
    for batching in ("random", "packed"):
        config = validate(RunConfig, {
            "model": "tiny-llama", "task": {"path": str(alpaca_file), "kind": "instruction", "max_length": 128},
            "plan": {"placement": "all", "allocation": 4},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "batching": batching, "latency_batches": 0}},
            "test")
        results[batching] = run_to_dict(config, tmp_path / batching)
    random, packed = results["random"], results["packed"]
    assert packed["status"] == "done" and packed["cost"]["padding_fraction"] == 0.0 < random["cost"]["padding_fraction"]
    assert packed["metrics"]["test"]["loss"] == pytest.approx(random["metrics"]["test"]["loss"], rel=1e-4)
    assert packed["metrics"]["test"]["loss"] < packed["metrics"]["test"]["base_loss"]  # it trained
    assert packed["cost"]["train_tokens"] == random["cost"]["train_tokens"]


@pytest.mark.parametrize("changes, message", [
    ({"task": "reviews"}, "packed applies to instruction tasks"),
    ({"method": "prefix"}, "method prefix reads each example as a padded row"),
])
def test_packing_where_it_cannot_apply_is_refused_in_one_line(alpaca_file, changes, message):
    config = {"model": "tiny-llama", "task": {"path": str(alpaca_file), "kind": "instruction"},
              "train": {"batching": "packed"}, **changes}
    with pytest.raises(PeftlabError, match=message):
        validate(RunConfig, config, "test")


def test_packing_on_a_family_not_known_to_read_packed_rows_is_refused():
    from peftlab.train.batching import check_packable

    with pytest.raises(PeftlabError, match="bert models are not known to confine attention"):
        check_packable("bert", 1)
    with pytest.raises(PeftlabError, match="one process"):
        check_packable("llama", 2)
    check_packable("gemma3_text", 1)
    assert json.dumps(["gpt2", "llama", "phi3"])  # the families PACKABLE names
