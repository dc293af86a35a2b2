"""Importance measures, the importance allocation, `peftlab importance` and `peftlab recommend` on tiny models."""

import json
from functools import partial

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.importance.measures import pooled_ranks, update_spectrum
from peftlab.importance.probe import activation_probe, gradient_probe, probe, training_probe
from peftlab.models.load import count_params, load_model, load_tokenizer
from peftlab.models.sites import resolve_sites
from peftlab.plans.plan import build_plan
from peftlab.specs import ModelSpec, PlanSpec, RunConfig, TrainSpec
from peftlab.tasks.prepare import collate, collate_indexed, load_task
from peftlab.train.batching import Batches

pytestmark = pytest.mark.usefixtures("private_cache")  # a cache of its own per test


def config_for(path, model="tiny-bert", **plan):
    return validate(RunConfig, {"model": model, "task": {"path": str(path), "kind": "classification"},
                                "plan": {"placement": "all", **plan}, "train": {"batch_size": 8, "lr": 5e-3}}, "test")


def scores(record):
    return [s["score"] for s in record["sites"]]


@pytest.mark.parametrize("measure", ["gradient", "fisher", "activation", "update", "adalora"])
def test_scores_are_deterministic_for_a_seed(reviews_file, measure):
    config = config_for(reviews_file)
    steps = 12 if measure == "adalora" else 4
    first, second = probe(config, measure, 4, steps, seed=0), probe(config, measure, 4, steps, seed=0)
    assert scores(first) == scores(second)
    assert any(s > 0 for s in scores(first))
    if measure in ("gradient", "fisher", "update"):  # another seed: another head and other batches
        assert scores(probe(config, measure, 4, steps, seed=1)) != scores(first)


def _setup(path, model_name="tiny-llama", seed=0, placement="all"):
    """Model, plan (r=4), loader and batches for a probe on the tiny reviews data."""
    config = config_for(path, model=model_name)
    tokenizer = load_tokenizer(config.model)
    data = load_task(config.task, tokenizer)
    spec = ModelSpec(name=model_name, head="sequence-classification", num_labels=2)
    model = load_model(spec, seed=seed)
    plan_spec = validate(PlanSpec, {"placement": placement, "allocation": 4}, "test")
    plan = build_plan(resolve_sites(model), count_params(model), plan_spec, model_name)
    lengths = [len(e["input_ids"]) for e in data.train]
    loader = DataLoader(range(len(data.train)), batch_sampler=Batches(lengths, 8, 0, bucketed=False),
                        collate_fn=partial(collate_indexed, examples=data.train, pad_id=tokenizer.pad_token_id))
    batches = [collate(data.train[i : i + 8], tokenizer.pad_token_id) for i in range(0, 32, 8)]
    return model, plan, loader, batches


def _by_site(plan, rows):
    return {(p.site.layer, p.site.role.value): row for p, row in zip(plan.sites, rows)}


@pytest.mark.parametrize("measure", ["gradient", "fisher", "update"])
def test_a_site_that_cannot_affect_the_loss_scores_zero(reviews_file, measure):
    # o is not adapted: trained, an adapter on it would reopen the path
    model, plan, loader, batches = _setup(reviews_file, placement="q,k,v,up,gate,down")
    with torch.no_grad():  # layer 1's attention output is multiplied by zero: q, k, v there cannot matter
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    if measure == "update":
        rows = training_probe(model, plan, loader, "classification", "update", 6, TrainSpec(batch_size=8, lr=1e-2), 0)
    else:
        rows = gradient_probe(model, plan, batches, "classification", measure)
    found = _by_site(plan, rows)
    for role in ("attn.q", "attn.k", "attn.v"):
        assert found[(1, role)]["score"] == 0.0, (role, found[(1, role)])
        assert found[(0, role)]["score"] > 0  # the same role one layer down still matters
    if measure == "update":
        assert found[(1, "attn.v")]["norm"] == 0.0 and found[(1, "attn.v")]["effective_rank"] == 0.0


def test_activation_of_a_zeroed_input_scores_zero(reviews_file):
    model, plan, _, batches = _setup(reviews_file)
    with torch.no_grad():  # the down projection of layer 2 only ever sees act(0) * 0 = 0
        model.model.layers[2].mlp.up_proj.weight.zero_()
    rows = activation_probe(model, plan, batches, "classification", rank=4)
    found = _by_site(plan, rows)
    assert found[(2, "ffn.down")] == {"score": 0.0, "explained_top_r": 0.0}
    assert found[(1, "ffn.down")]["score"] > 0
    assert sum(r["score"] for r in rows) == 4 * len(plan.sites)  # EVA pools n_sites x rank directions


def test_update_spectrum_of_a_hand_built_rank_2_update():
    torch.manual_seed(0)
    left = torch.linalg.qr(torch.randn(48, 4)).Q  # orthonormal columns
    right = torch.linalg.qr(torch.randn(32, 4)).Q.T  # orthonormal rows
    b = left * torch.tensor([1.0, 1.0, 0.0, 0.0])  # B (48 x 4): two live directions
    spectrum = update_spectrum(b @ right, rank=4)  # B A
    assert spectrum["effective_rank"] == pytest.approx(2.0, abs=1e-6)
    assert spectrum["rank_90"] == 2
    assert spectrum["energy_top1"] == pytest.approx(0.5, abs=1e-6)
    uneven = update_spectrum((left * torch.tensor([3.0, 2.0, 0.0, 0.0])) @ right, rank=4)
    assert 1.0 < uneven["effective_rank"] < 2.0 and uneven["rank_90"] == 2
    assert update_spectrum(torch.zeros(8, 8))["effective_rank"] == 0.0


def test_pooled_ranks_give_the_budget_to_the_most_concentrated_inputs():
    peaked = torch.tensor([0.9, 0.05, 0.05, 0.0])
    flat = torch.tensor([0.25, 0.25, 0.25, 0.25])
    counts = pooled_ranks([peaked, flat, torch.zeros(4)], rank=2)
    assert sum(counts) == 6 and counts[2] == 0
    assert counts == [2, 4, 0]  # flat offers rho x rank = 4 directions at 0.25; peaked its 0.9 and one 0.05


def test_importance_allocation_in_a_run(tmp_path, reviews_file, monkeypatch):
    from conftest import run_to_dict

    from peftlab.importance import probe as probe_module

    config = config_for(reviews_file, allocation="budget(6000, importance(fisher, steps=4))")
    config = config.model_copy(update={"train": TrainSpec(max_steps=3, batch_size=8, latency_batches=0)})
    result = run_to_dict(config, tmp_path / "a")
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    ranks = [s["rank"] for s in plan["sites"]]
    assert len(set(ranks)) > 1  # shaped by the scores
    assert abs(result["cost"]["adapter_params"] - 6000) / 6000 < 0.1
    record = json.loads((tmp_path / "a" / "importance.json").read_text())
    assert record["measure"] == "fisher" and len(record["sites"]) == len(plan["sites"])
    assert result["cost"]["importance_probe_seconds"] == record["seconds"] > 0

    def no_probe(*args, **kwargs):
        raise AssertionError("the cached scores should be reused")

    monkeypatch.setattr(probe_module, "probe", no_probe)
    other = config.model_copy(update={"train": TrainSpec(max_steps=3, batch_size=8, latency_batches=0, seed=1)})
    run_to_dict(other, tmp_path / "b")  # another training seed, the same probe
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["sites"] == plan["sites"]


def test_importance_allocation_needs_a_probe(cli):
    code, _, err = cli("plan", "--model", "tiny-bert", "--allocation", "importance(fisher)")
    assert code == 2 and "needs a model and a task to probe" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("plan", "--model", "tiny-bert", "--allocation", "importance(entropy)")
    assert code == 2 and "gradient" in err


def test_cli_importance_writes_scores_that_feed_from_scores(cli, tmp_path, reviews_file):
    out = tmp_path / "imp"
    code, stdout, err = cli("importance", "--model", "tiny-gpt2", "--data", reviews_file, "--kind", "classification",
                            "--measure", "gradient,activation", "--steps", "3", "--output", out)
    assert code == 0, err
    for name in ("importance-gradient.json", "importance-gradient.csv", "importance-activation.csv", "importance.png"):
        assert (out / name).is_file(), name
    rows = (out / "importance-gradient.csv").read_text().splitlines()
    assert rows[0].startswith("layer,role,path,score") and len(rows) == 1 + 2 * 4  # 2 layers x (qkv, o, up, down)
    code, stdout, err = cli("plan", "--model", "tiny-gpt2", "--allocation",
                            f"from-scores({out / 'importance-gradient.json'}, min=1, max=16)", "--json")
    assert code == 0, err
    assert len({s["rank"] for s in json.loads(stdout)["sites"]}) > 1
    code, _, err = cli("importance", "--model", "tiny-gpt2", "--data", reviews_file, "--kind", "classification",
                       "--measure", "entropy")
    assert code == 2 and "valid measures" in err


def test_cli_recommend_writes_a_config_under_the_budget(cli, tmp_path, reviews_file):
    out = tmp_path / "recommended.yaml"
    code, stdout, err = cli("recommend", "--budget", "8000", "--model", "tiny-bert", "--data", reviews_file,
                            "--kind", "classification", "--steps", "3", "--output", out)
    assert code == 0, err
    assert "Importance (fisher)" in stdout and "Proposed:" in stdout
    config = RunConfig.model_validate(yaml.safe_load(out.read_text()))
    assert config.plan.allocation.kind == "budget" and config.plan.allocation.params == 8000
    assert config.plan.allocation.shape_.kind == "importance"
    code, _, err = cli("recommend", "--budget", "10", "--model", "tiny-bert", "--data", reviews_file, "--kind", "classification",
                       "--steps", "3")
    assert code == 2 and "below the smallest plan" in err


def test_recommend_follows_a_study_that_measured_a_clear_winner(tmp_path, reviews_file):
    from peftlab.analysis.recommend import recommend
    from peftlab.api import make_plan
    from peftlab.specs import PlanConfig, StudySpec
    from peftlab.studies.grid import expand
    from peftlab.studies.runner import open_study

    spec = validate(StudySpec, {
        "name": "where", "base": {"model": "tiny-bert", "task": {"path": str(reviews_file), "kind": "classification"}},
        "axes": {"placement": {"all": "all", "attention": "attention", "ffn": "ffn"}}, "seeds": [0, 1, 2, 3],
    }, "test")
    study_dir = tmp_path / "study"
    store, _ = open_study(spec, study_dir)
    accuracy = {"all": 0.80, "attention": 0.90, "ffn": 0.70}
    for run in expand(spec):
        config = RunConfig.model_validate(run.config)
        plan = make_plan(PlanConfig(model=config.model, plan=config.plan))
        acc = accuracy[run.axes["placement"]] + 0.01 * (run.seed % 2) + 0.003 * run.seed * (run.axes["placement"] != "attention")
        result = {"status": "done", "metrics": {"test": {"accuracy": acc}},
                  "cost": {"trainable_params": plan.trainable_params + 130, "adapter_params": plan.trainable_params},
                  "data": {"kind": "classification"}}
        store.mark_running(run.id, None)
        store.finish(run.id, "done", result, None)
    config = config_for(reviews_file)
    advice = recommend(config, 20000, "fisher", steps=3, study=study_dir)
    text = " ".join(advice.lines)
    assert "placement=attention has the best test accuracy" in text and "significantly better than" in text
    assert "degenerate" not in text
    assert {p.site.role.value for p in advice.plan.sites} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    assert abs(advice.plan.trainable_params - 20000) / 20000 < 0.1
    with pytest.raises(PeftlabError, match="below the smallest plan"):
        recommend(config, 100, "fisher", steps=3, study=study_dir)
    for row in store.rows():  # the best configuration turns out to have collapsed on three of four seeds
        if '"attention"' in row["axes"] and row["seed"] < 3:
            result = json.loads(row["result"])
            result["metrics"]["test"]["predicted_classes"] = 1
            store.finish(row["id"], "done", result, None)
    text = " ".join(recommend(config, 20000, "fisher", steps=3, study=study_dir).lines)
    assert "3 of 4 runs of placement=attention are degenerate (most of its runs learned nothing)" in text
