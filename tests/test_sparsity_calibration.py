"""SparseLoRA's calibrated sparsity (`sparsity: auto(loss_budget=...)`): the profile, the knapsack, the dense
fallback, and whether predicted loss increases add up."""

import itertools
import json
import math

import pytest
import torch
from conftest import make_plan

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.registry import make_method
from peftlab.methods.sparselora.channels import SparseProjection
from peftlab.methods.sparselora.profile import (
    BlockProfile,
    SparsityProfile,
    choose_levels,
    measure_profile,
)
from peftlab.methods.specs import SparseLoraSpec
from peftlab.models.load import head_modules, load_model
from peftlab.models.sites import layer_blocks
from peftlab.specs import ModelSpec, RunConfig
from peftlab.studies.grid import learned_config

KINDS = {"tiny-llama": ("causal-lm", "instruction"), "tiny-gpt2": ("causal-lm", "instruction"),
         "tiny-bert": ("sequence-classification", "classification"),
         "tiny-distilbert": ("sequence-classification", "classification")}


def batches(arch, count=2, seed=0):
    kind = KINDS[arch][1]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(200, 2000, (4, 24), generator=g)
        labels = ids.clone() if kind == "instruction" else torch.arange(4) % 2
        if kind == "instruction":
            labels[:, :12] = -100  # a prompt: context tokens, which run sparse
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def applied(arch, auto, before=None):
    torch.manual_seed(0)
    model = load_model(ModelSpec(name=arch, head=KINDS[arch][0]), seed=0)
    if before is not None:
        before(model)
    method = make_method(SparseLoraSpec(sparsity=auto), total_steps=10)
    model = method.apply(model, make_plan(arch, placement="all", allocation=4), head_modules(model))
    return method, model


def profile_of(method, model, arch, levels, replay=True):
    return measure_profile(model, method.blocks, batches(arch), KINDS[arch][1], levels, method.prepare_batch,
                           method.state, replay=replay)


@pytest.mark.parametrize("arch, path, block", [("tiny-llama", "model.layers.1.self_attn.o_proj", "attention"),
                                               ("tiny-llama", "model.layers.2.mlp.down_proj", "ffn"),
                                               ("tiny-bert", "bert.encoder.layer.0.output.dense", "ffn")])
def test_a_block_whose_output_projection_is_zero_has_a_flat_profile(arch, path, block):
    def zero(model):
        with torch.no_grad():
            model.get_submodule(path).weight.zero_()

    layer = int(path.split(".")[3 if arch == "tiny-bert" else 2])
    method, model = applied(arch, "auto", zero)
    profile = profile_of(method, model, arch, [0.25, 0.5, 0.9])
    flat = next(b for b in profile.blocks if (b.layer, b.block) == (layer, block))
    assert flat.increase == [0.0, 0.0, 0.0] and flat.output_error == [0.0, 0.0, 0.0]
    assert all(s > 0 for s in flat.saving)  # it still saves FLOPs: the cheapest block to sparsify
    others = [b for b in profile.blocks if b is not flat]
    assert any(abs(x) > 1e-6 for b in others for x in b.increase)  # the measure does see the other blocks


@pytest.mark.parametrize("arch", list(KINDS))
def test_replaying_the_layers_below_each_block_gives_the_profile_that_recomputing_them_gives(arch):
    method, model = applied(arch, "auto")
    layers, _ = layer_blocks(model)
    first = []  # one entry per time layer 0 computes
    handle = next(layers[0].children()).register_forward_pre_hook(lambda *_: first.append(1))
    levels = [0.25, 0.75]
    recomputed = profile_of(method, model, arch, levels, replay=False)
    computed_without, first[:] = len(first), []
    replayed = profile_of(method, model, arch, levels)
    handle.remove()
    blocks, own = len(method.blocks), sum(b.layer == 0 for b in method.blocks)
    assert computed_without == 2 * (1 + blocks * len(levels))  # 2 batches: the dense pass, then every run
    assert len(first) == 2 * (1 + own * len(levels))  # only layer 0's own blocks compute it again
    assert replayed.base_loss == recomputed.base_loss
    for a, b in zip(replayed.blocks, recomputed.blocks):
        assert (a.layer, a.block) == (b.layer, b.block)
        assert a.increase == pytest.approx(b.increase, rel=1e-5, abs=1e-7)
        assert a.output_error == pytest.approx(b.output_error, rel=1e-5, abs=1e-7)
        assert a.saving == pytest.approx(b.saving, rel=1e-9)
    assert any(abs(x) > 1e-6 for b in replayed.blocks for x in b.increase)  # the blocks do move the loss
    assert not any("forward" in vars(layer) for layer in layers)  # every layer computes again after


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-distilbert"])
def test_a_classifier_is_profiled_on_the_representation_its_head_reads_not_on_its_untrained_loss(arch):
    def silence_the_head(model):  # an untrained head at its extreme: the loss is ln 2 whatever the backbone does
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "classifier" in name:
                    p.zero_()

    method, model = applied(arch, "auto", silence_the_head)
    profile = profile_of(method, model, arch, [0.5, 0.9])
    assert profile.measure == "representation" and profile.base_loss == pytest.approx(math.log(2))
    for b in profile.blocks:  # the relative squared error of the [CLS] hidden state
        assert b.increase == pytest.approx([e * e for e in b.output_error], rel=1e-9, abs=1e-12)
    last = max(b.layer for b in profile.blocks)
    top_ffn = next(b for b in profile.blocks if (b.layer, b.block) == (last, "ffn"))
    # the token the head reads runs dense, and the FFN is position-wise: no change beyond rounding
    assert top_ffn.increase == pytest.approx([0.0, 0.0], abs=1e-12)
    assert min(b.increase[-1] for b in profile.blocks if b is not top_ffn) > 1e-9  # every other block moves it
    allocation = choose_levels(profile, 0.05)
    method.initialize(model, batches(arch, 4), held_out=batches(arch, 4, seed=1))
    calibration = method.report(model)["calibration"]
    assert calibration["levels"] == allocation.levels
    assert not calibration["dense"]  # errors of ~1e-4 per block: a 5% budget takes every block that saves
    assert calibration["measured_increase"] > 0 and calibration["held_out_increase"] > 0  # measured the same way


def test_a_budget_of_zero_runs_dense_lora():
    method, model = applied("tiny-llama", "auto(0)")
    method.initialize(model, batches("tiny-llama"))
    report = method.report(model)["calibration"]
    assert report["dense"] and "allows no sparsity" in report["reason"] and report["profile_seconds"] == 0.0
    assert not method.blocks and not any(isinstance(m, SparseProjection) for m in model.modules())
    assert method.report(model)["sparsity"] == {"ffn": [0.0] * 4, "attention": [0.0] * 4}


def hand_profile():
    """Three blocks, levels 0.5 and 0.9: increases and net savings chosen so that greedy choices go wrong."""
    return SparsityProfile(levels=[0.5, 0.9], base_loss=2.0, examples=8, blocks=[
        BlockProfile(0, "ffn", increase=[0.004, 0.009], output_error=[0, 0], saving=[0.20, 0.30]),
        BlockProfile(0, "attention", increase=[0.002, 0.003], output_error=[0, 0], saving=[0.05, 0.15]),
        BlockProfile(1, "ffn", increase=[0.001, -0.006], output_error=[0, 0], saving=[0.10, -0.01]),
    ])


def brute_force(profile, budget):
    """The best net saving over every combination of one level (or dense) per block, increases taken as the
    knapsack takes them (the largest change either way at that level or below)."""
    best = 0.0
    per_block = []
    for b in profile.blocks:
        worst, options = 0.0, [(0.0, 0.0)]
        for increase, saving in zip(b.increase, b.saving):
            worst = max(worst, abs(increase))
            if saving > 0:
                options.append((worst, saving))
        per_block.append(options)
    for combination in itertools.product(*per_block):
        if sum(c[0] for c in combination) <= budget + 1e-12:
            best = max(best, sum(c[1] for c in combination))
    return best


@pytest.mark.parametrize("budget", [0.001, 0.003, 0.005, 0.006, 0.01, 0.012, 0.02])
def test_the_knapsack_picks_the_largest_saving_within_the_budget(budget):
    profile = hand_profile()
    allocation = choose_levels(profile, budget)
    assert allocation.saving == pytest.approx(brute_force(profile, budget))
    assert allocation.predicted_increase <= budget + 1e-12
    assert allocation.levels["1.ffn"] in (0.0, 0.5)  # 0.9 saves nothing net of the estimator; its noise is not free


def test_the_knapsack_on_a_budget_that_fits_one_block():
    # ffn 0 at 0.5 alone saves 0.20 for the whole budget; attention 0 at 0.9 and ffn 1 at 0.5 save 0.25 for it
    allocation = choose_levels(hand_profile(), 0.004)
    assert allocation.levels == {"0.ffn": 0.0, "0.attention": 0.9, "1.ffn": 0.5}
    assert allocation.saving == pytest.approx(0.25) and allocation.predicted_increase == pytest.approx(0.004)


def test_nothing_that_saves_within_the_budget_means_dense():
    profile = hand_profile()
    for b in profile.blocks:
        b.saving = [-0.01, -0.02]  # the estimator costs more than any level saves
    allocation = choose_levels(profile, 0.5)
    assert allocation.dense and set(allocation.levels.values()) == {0.0} and "every block runs dense" in allocation.reason


@pytest.mark.parametrize("level", [0.1, 0.25])
def test_predicted_increases_add_up_to_the_measured_one(level):
    method, model = applied("tiny-llama", "auto")
    profile = profile_of(method, model, "tiny-llama", [level])
    predicted = sum(b.increase[0] for b in profile.blocks)
    for block in method.blocks:
        block.sparsity = level
    joint = measure_profile(model, [], batches("tiny-llama"), "instruction", [], method.prepare_batch, method.state)
    measured = joint.base_loss / profile.base_loss - 1
    assert abs(measured) > 1e-5  # large enough to compare
    assert measured == pytest.approx(predicted, abs=0.3 * sum(abs(b.increase[0]) for b in profile.blocks) + 1e-6)


def test_a_run_records_its_allocation_and_a_second_run_reads_the_profile_from_the_cache(private_cache):
    first, model = applied("tiny-llama", "auto(loss_budget=0.05, batches=2)")
    first.initialize(model, batches("tiny-llama", 4))
    report = first.report(model)
    calibration = report["calibration"]
    assert not calibration["dense"] and not calibration["profile_cached"]
    assert calibration["predicted_increase"] <= 0.05 and calibration["measured_increase"] is not None
    chosen = {k: v for k, v in calibration["levels"].items() if v > 0}
    assert len(first.blocks) == len(chosen)  # blocks left dense are unwrapped
    assert report["sparsity"]["ffn"] == [calibration["levels"][f"{i}.ffn"] for i in range(4)]
    second, model = applied("tiny-llama", "auto(loss_budget=0.05, batches=2)")
    second.initialize(model, batches("tiny-llama", 4))
    again = second.report(model)["calibration"]
    assert again["profile_cached"] and again["levels"] == calibration["levels"]


def test_the_allocation_is_also_measured_on_held_out_batches(private_cache):
    train, other = batches("tiny-llama", 4), batches("tiny-llama", 4, seed=1)
    same, model = applied("tiny-llama", "auto(loss_budget=0.05, batches=2)")
    same.initialize(model, train, held_out=train)  # held out = the profile's own batches: the measured increase
    calibration = same.report(model)["calibration"]
    assert not calibration["dense"]
    assert calibration["held_out_increase"] == pytest.approx(calibration["measured_increase"], rel=1e-6)
    method, model = applied("tiny-llama", "auto(loss_budget=0.05, batches=2)")
    method.initialize(model, train, held_out=other)
    held_out = method.report(model)["calibration"]
    assert held_out["levels"] == calibration["levels"]
    chosen = method.profile_batches(other)
    sparse = measure_profile(model, [], chosen, "instruction", [], method.prepare_batch, method.state).base_loss
    for block in method.blocks:
        block.sparsity = 0.0
    dense = measure_profile(model, [], chosen, "instruction", [], method.prepare_batch, method.state).base_loss
    assert held_out["held_out_increase"] == pytest.approx(sparse / dense - 1, rel=1e-6)
    assert abs(held_out["held_out_increase"] - held_out["measured_increase"]) > 1e-6  # other data, another figure


def test_the_spec_reads_auto_and_refuses_fixed_levels_beside_it():
    assert SparseLoraSpec(sparsity="auto(0.02)").sparsity.loss_budget == 0.02
    assert SparseLoraSpec(sparsity="auto(loss_budget=0.05, batches=2)").sparsity.batches == 2
    base = {"model": "tiny-llama", "task": {"path": "d.jsonl", "kind": "instruction"}}
    with pytest.raises(PeftlabError, match="chooses every level itself; drop ffn_sparsity"):
        validate(RunConfig, {**base, "method": {"name": "sparselora", "sparsity": "auto", "ffn_sparsity": 0.5}}, "t")
    with pytest.raises(PeftlabError, match="method.sparsity"):
        validate(RunConfig, {**base, "method": {"name": "sparselora", "sparsity": "sometimes"}}, "t")
    with pytest.raises(PeftlabError, match="levels"):
        validate(RunConfig, {**base, "method": {"name": "sparselora", "sparsity": {"levels": [0.9, 0.5]}}}, "t")
    plain = validate(RunConfig, {**base, "method": "sparselora"}, "t").model_dump(mode="json", by_alias=True)
    assert "sparsity" not in learned_config(plain)["method"]  # existing SparseLoRA runs keep their ids


def test_the_sparsity_command_writes_the_profile_that_a_run_then_reads(tmp_path, cli, private_cache):
    data = tmp_path / "d.jsonl"
    words = ["red", "blue", "green", "black", "white", "gray"]
    data.write_text("".join(json.dumps({"instruction": f"say {w} twice", "output": f"{w} {w}"}) + "\n"
                            for w in words * 6))
    code, out, err = cli("sparsity", "--model", "tiny-llama", "--data", data, "--kind", "instruction",
                         "--levels", "0.5,0.9", "--batches", "2", "--batch-size", "4", "--output", tmp_path / "profile")
    assert code == 0, err
    record = json.loads((tmp_path / "profile" / "sparsity.json").read_text())
    assert record["levels"] == [0.5, 0.9] and len(record["blocks"]) == 8  # 4 layers x (ffn, attention)
    assert set(record["allocations"]) == {"0.005", "0.01", "0.02", "0.05"}
    rows = (tmp_path / "profile" / "sparsity.csv").read_text().splitlines()
    assert rows[0] == "layer,block,level,increase,output_error,flops_saved" and len(rows) == 1 + 8 * 2
    assert (tmp_path / "profile" / "sparsity.png").is_file() and "allocations" in out
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny-llama\ntask: {{path: {data}, kind: instruction}}\n"
                      "method: {name: sparselora, sparsity: {loss_budget: 0.02, levels: [0.5, 0.9], batches: 2}}\n"
                      "train: {max_steps: 2, batch_size: 4, latency_batches: 0}\n")
    code, out, err = cli("run", "-c", config, "--output", tmp_path / "run")
    assert code == 0, err
    calibration = json.loads((tmp_path / "run" / "result.json").read_text())["method"]["calibration"]
    assert calibration["profile_cached"]
    assert calibration["levels"] == record["allocations"]["0.02"]["levels"]
    code, _, err = cli("sparsity", "--model", "tiny-llama", "--levels", "half", "--output", tmp_path / "x")
    assert code == 2 and "--levels 'half'" in err


def test_run_summary_rows_come_from_the_method():
    from peftlab.methods.lora import LoraMethod
    from peftlab.methods.sparselora import SparseLoraMethod

    report = {"flops": {"executed_share": 0.42, "all_projections_share": 0.61},
              "calibration": {"loss_budget": 0.02, "dense": False, "levels": {"0.ffn": 0.5, "1.ffn": 0.0},
                              "predicted_increase": 0.015, "measured_increase": 0.012, "held_out_increase": None}}
    rows = dict(SparseLoraMethod.summary_rows(report))
    assert rows["frozen FLOPs executed (% of dense: sparsified blocks, all blocks)"] == "42.0%, 61.0%"
    assert rows["sparsity auto, 2.0% loss budget"] == "1 of 2 blocks sparse; loss +1.50% predicted, +1.20% measured"
    assert LoraMethod.summary_rows(report) == []
