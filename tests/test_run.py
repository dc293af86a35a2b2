"""One run end to end on tiny models: outputs, reproducibility, reload, failure records, bad data."""

import json

import pytest
import torch
from peft import PeftModel

from peftlab.config import validate
from peftlab.measures import BY_NAME, COSTS
from peftlab.models.load import load_model, load_tokenizer
from peftlab.records.degenerate import degenerate_reason
from peftlab.specs import ModelSpec, RunConfig
from peftlab.tasks.prepare import collate, load_task
from peftlab.train.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("private_cache")  # a cache of its own per test


def classification_config(path, **train):
    return validate(RunConfig, {
        "model": "tiny-bert",
        "task": {"path": str(path), "kind": "classification"},
        "plan": {"placement": "attention", "allocation": 4},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 5e-3, "latency_batches": 2, **train},
    }, "test")


def test_run_writes_every_output_and_reloads(tmp_path, reviews_file):
    from conftest import run_to_dict

    out = tmp_path / "run"
    result = run_to_dict(classification_config(reviews_file), out)
    assert result["status"] == "done"
    assert {p.name for p in out.iterdir()} == {"config.yaml", "plan.json", "metrics.jsonl", "result.json", "adapter"}
    assert not (tmp_path / "run.partial").exists()
    assert json.loads((out / "result.json").read_text())["metrics"] == result["metrics"]
    cost = result["cost"]
    assert cost["adapter_params"] == cost["plan_params"] == json.loads((out / "plan.json").read_text())["totals"]["trainable_params"]
    assert cost["head_params"] == 64 * 2 + 2
    assert cost["adapter_bytes"] > 0 and cost["train_tokens"] > 0
    assert cost["peak_memory_process_bytes"] > cost["peak_memory_bytes"] >= 0  # a tiny model adds next to nothing
    assert set(cost["latency_ms_per_batch"]) == {"unmerged", "merged"}
    assert set(result["metrics"]["test"]) - {"count"} <= set(BY_NAME)  # every metric a report names is declared
    assert {c.column for c in COSTS} <= set(cost)  # and every cost a study can be judged by
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "train_loss" in h] == [10, 12]
    # the saved adapter (PEFT format) gives the same test loss after a reload
    config = classification_config(reviews_file)
    tokenizer = load_tokenizer(config.model)
    data = load_task(config.task, tokenizer)
    base = load_model(ModelSpec(name="tiny-bert", head="sequence-classification"), seed=0)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    batches = [collate(data.test[i : i + 64], tokenizer.pad_token_id) for i in range(0, len(data.test), 64)]
    again = evaluate(reloaded, batches, "classification", 2, "cpu")
    assert again["loss"] == pytest.approx(result["metrics"]["test"]["loss"], abs=1e-6)


def test_same_seed_same_metrics(tmp_path, reviews_file):
    from conftest import run_to_dict

    first = run_to_dict(classification_config(reviews_file), tmp_path / "a")
    second = run_to_dict(classification_config(reviews_file), tmp_path / "b")
    other = run_to_dict(classification_config(reviews_file, seed=1), tmp_path / "c")
    assert first["metrics"] == second["metrics"]
    assert first["final_train_loss"] == second["final_train_loss"]
    assert first["metrics"] != other["metrics"]


def test_native_precision_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch):
    from peftlab.train import context

    monkeypatch.setattr(context, "cpu_has_bf16", lambda: True)
    assert (context.precision("native", "cpu"), context.precision("auto", "cpu")) == ("bf16", "no")
    monkeypatch.setattr(context, "cpu_has_bf16", lambda: False)
    assert (context.precision("native", "cpu"), context.precision("auto", "cpu")) == ("no", "no")


def test_bf16_autocast_on_cpu_trains_and_evaluates_in_bf16(tmp_path, reviews_file):
    from conftest import run_to_dict

    fp32 = run_to_dict(classification_config(reviews_file), tmp_path / "fp32")
    bf16 = run_to_dict(classification_config(reviews_file, precision="bf16"), tmp_path / "bf16")
    assert fp32["environment"]["mixed_precision"] == "no" and bf16["environment"]["mixed_precision"] == "bf16"
    assert bf16["status"] == "done" and bf16["final_train_loss"] != fp32["final_train_loss"]
    # bf16 rounding, not another model: the losses stay close
    assert bf16["metrics"]["test"]["loss"] == pytest.approx(fp32["metrics"]["test"]["loss"], rel=0.05)
    # the adapters stay fp32 (autocast casts the matmul inputs, not the parameters)
    adapter = PeftModel.from_pretrained(load_model(ModelSpec(name="tiny-bert", head="sequence-classification"), seed=0),
                                        tmp_path / "bf16" / "adapter")
    assert {p.dtype for n, p in adapter.named_parameters() if "lora_" in n} == {torch.float32}


def test_evaluate_runs_under_the_given_autocast(reviews_file):
    config = classification_config(reviews_file)
    tokenizer = load_tokenizer(config.model)
    data = load_task(config.task, tokenizer)
    model = load_model(ModelSpec(name="tiny-bert", head="sequence-classification"), seed=0)
    batches = [collate(data.test, tokenizer.pad_token_id)]
    fp32 = evaluate(model, batches, "classification", 2, "cpu")
    bf16 = evaluate(model, batches, "classification", 2, "cpu", autocast=lambda: torch.autocast("cpu", torch.bfloat16))
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)


def test_cli_fp16_on_cpu_is_a_clear_error(tmp_path, reviews_file, cli):
    config = tmp_path / "run.yaml"
    config.write_text(classification_config(reviews_file, precision="fp16").to_yaml())
    code, _, err = cli("run", "-c", str(config), "--output", str(tmp_path / "run"))
    assert code == 2 and "train.precision: fp16 autocast needs a GPU" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_lora_learns_the_tiny_task(tmp_path, reviews_file):
    from conftest import run_to_dict

    result = run_to_dict(classification_config(reviews_file, max_steps=60, lr=2e-2), tmp_path / "r")
    history = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert losses[-1] < losses[0] * 0.5
    assert result["metrics"]["test"]["accuracy"] >= 0.9
    assert result["metrics"]["test"]["predicted_classes"] == 2
    assert degenerate_reason(flat(result)) is None


def flat(result):
    return {f"metrics.test.{k}": v for k, v in result["metrics"]["test"].items()}


def test_a_collapsed_classifier_is_flagged(tmp_path, reviews_file):
    from conftest import run_to_dict

    # a learning rate far too large for the head: every example ends in one class
    result = run_to_dict(classification_config(reviews_file, max_steps=30, lr=3.0), tmp_path / "r")
    test = result["metrics"]["test"]
    assert result["status"] == "done" and test["predicted_classes"] == 1
    assert test["accuracy"] == pytest.approx(test["majority_rate"]) or test["accuracy"] == pytest.approx(1 - test["majority_rate"])
    assert degenerate_reason(flat(result)) == "predicts a single class"


def test_a_causal_lm_that_learned_nothing_keeps_the_base_loss_and_is_flagged(tmp_path, alpaca_file):
    from conftest import run_to_dict

    def run(lr, name):
        config = validate(RunConfig, {
            "model": "tiny-llama", "task": {"path": str(alpaca_file), "kind": "instruction"},
            "plan": {"allocation": 4}, "train": {"max_steps": 12, "batch_size": 4, "lr": lr, "latency_batches": 0},
        }, "test")
        return run_to_dict(config, tmp_path / name)

    still = run(1e-9, "still")
    assert still["metrics"]["test"]["base_loss"] == pytest.approx(still["metrics"]["test"]["loss"], rel=1e-4)
    assert "not below the base model's" in degenerate_reason(flat(still))
    learned = run(2e-2, "learned")
    assert learned["metrics"]["test"]["loss"] < learned["metrics"]["test"]["base_loss"]
    assert learned["metrics"]["test"]["base_loss"] == pytest.approx(still["metrics"]["test"]["base_loss"])  # same start
    assert degenerate_reason(flat(learned)) is None


def test_degenerate_reasons_on_hand_made_rows():
    row = {"metrics.test.accuracy": 0.64, "metrics.test.majority_rate": 0.62, "metrics.test.count": 300,
           "metrics.test.predicted_classes": 2}
    assert "within noise of the majority class (0.620 ± 0.055)" in degenerate_reason(row)
    assert degenerate_reason({**row, "metrics.test.accuracy": 0.70}) is None
    assert degenerate_reason({"metrics.test.accuracy": 0.62}) is None  # an older row: nothing to judge by
    assert degenerate_reason({"metrics.test.loss": float("inf")}).startswith("diverged")


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_other_methods_run(tmp_path, reviews_file, method):
    from conftest import run_to_dict

    config = classification_config(reviews_file).model_copy(update={"method": validate(RunConfig, {"method": method}, "t").method})
    result = run_to_dict(config, tmp_path / method)
    assert result["status"] == "done"
    assert result["cost"]["total_params"] == result["cost"]["base_params"]
    assert "merged" not in result["cost"]["latency_ms_per_batch"]


def test_instruction_run_reports_perplexity(tmp_path, alpaca_file):
    from conftest import run_to_dict

    config = validate(RunConfig, {
        "model": "tiny-llama",
        "task": {"path": str(alpaca_file), "kind": "instruction"},
        "plan": {"allocation": 4},
        "train": {"max_steps": 4, "batch_size": 4, "latency_batches": 1},
    }, "test")
    result = run_to_dict(config, tmp_path / "instr")
    test = result["metrics"]["test"]
    assert test["perplexity"] == pytest.approx(torch.tensor(test["loss"]).exp().item(), rel=1e-6)
    assert result["data"]["kind"] == "instruction"


def test_non_finite_loss_is_a_failure_record(tmp_path, reviews_file, monkeypatch):
    from conftest import run_to_dict

    import peftlab.train.loop as loop

    real = loop.batch_nll
    calls = {"n": 0}

    def poisoned(model, batch, kind, hidden_states=None):
        calls["n"] += 1
        nll, count, logits = real(model, batch, kind, hidden_states)
        return (nll * float("nan"), count, logits) if calls["n"] == 3 else (nll, count, logits)

    monkeypatch.setattr(loop, "batch_nll", poisoned)
    result = run_to_dict(classification_config(reviews_file), tmp_path / "nan")
    assert result["status"] == "failed" and "non-finite loss (nan) at step 3" in result["error"]
    saved = json.loads((tmp_path / "nan" / "result.json").read_text())
    assert saved["status"] == "failed" and saved["cost"]["steps"] == 2




def test_cli_bad_data_exits_2_and_writes_no_run(tmp_path, cli):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\nno label here\n")
    out = tmp_path / "run"
    code, _, err = cli("run", "--model", "tiny-bert", "--data", str(bad),
                           "--kind", "classification", "--output", str(out))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.csv: line 3: 1 fields, the header has 2 (text, label)" in lines[0]
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_cli_run_prints_the_result(tmp_path, reviews_file, cli):
    out = tmp_path / "run"
    code, stdout, _ = cli("run", "--model", "tiny-bert", "--data", str(reviews_file),
                              "--kind", "classification", "--max-steps", "3", "--placement", "q,v",
                              "--rank", "2", "--output", str(out))
    assert code == 0
    assert "test accuracy" in stdout and "trainable params (adapter + head)" in stdout
    plan = json.loads((out / "plan.json").read_text())
    assert {s["role"] for s in plan["sites"]} == {"attn.q", "attn.v"}


def test_eval_every_and_gradient_accumulation(tmp_path, reviews_file):
    from conftest import run_to_dict

    one = run_to_dict(classification_config(reviews_file, max_steps=4, eval_every=2), tmp_path / "one")
    two = run_to_dict(classification_config(reviews_file, max_steps=4, grad_accum=2, eval_at=[0.75, 0.5]),
                      tmp_path / "two")
    history = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [(h["step"], h["split"]) for h in history if "split" in h] == [(2, "validation"), (4, "validation"), (4, "test")]
    # eval_at: validation also at 50% and 75% of the steps, kept in the result beside the final validation
    history = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(h["step"], h["split"]) for h in history if "split" in h] == [(2, "validation"), (3, "validation"),
                                                                         (4, "validation"), (4, "test")]
    assert {k for k in two["metrics"]} == {"validation@0.5", "validation@0.75", "validation", "test"}
    at_three = next(h for h in history if h.get("split") == "validation" and h["step"] == 3)
    assert two["metrics"]["validation@0.75"] == {k: v for k, v in at_three.items() if k not in ("step", "split")}
    # an optimizer step over two micro-batches sees twice the data
    assert two["cost"]["steps"] == one["cost"]["steps"] == 4
    assert 1.5 < two["cost"]["train_tokens"] / one["cost"]["train_tokens"] < 2.5


@pytest.mark.parametrize("method", [{"name": "hira"}, {"name": "lora", "use_dora": True, "loraplus": True},
                                    {"name": "bottleneck", "variant": "pfeiffer"}])
def test_adapter_variants_run_end_to_end(tmp_path, reviews_file, method):
    from conftest import run_to_dict

    override = validate(RunConfig, {"method": method, "plan": {"placement": "all", "allocation": 4}}, "t")
    config = classification_config(reviews_file).model_copy(update={"method": override.method, "plan": override.plan})
    result = run_to_dict(config, tmp_path / "variant")
    cost = result["cost"]
    merged_or_base = "base" if method["name"] == "bottleneck" else "merged"  # adapters report their overhead
    assert result["status"] == "done" and set(cost["latency_ms_per_batch"]) == {"unmerged", merged_or_base}
    assert cost["total_params"] == cost["base_params"] + cost["adapter_params"]
    if method["name"] != "bottleneck":
        assert cost["adapter_params"] >= cost["plan_params"]  # DoRA adds a magnitude per output channel


def test_gpt2_q_v_slices_run_end_to_end(tmp_path, alpaca_file):
    from conftest import run_to_dict

    config = validate(RunConfig, {
        "model": "tiny-gpt2",
        "task": {"path": str(alpaca_file), "kind": "instruction"},
        "plan": {"placement": "q,v", "allocation": 4},
        "train": {"max_steps": 3, "batch_size": 4, "latency_batches": 1},
    }, "test")
    result = run_to_dict(config, tmp_path / "qv")
    assert result["status"] == "done"
    assert result["cost"]["adapter_params"] == result["cost"]["plan_params"] == 2 * 2 * 4 * (64 + 64)
    assert {"fused_slices.safetensors", "fused_slices.json"} <= {p.name for p in (tmp_path / "qv" / "adapter").iterdir()}
    assert set(result["cost"]["latency_ms_per_batch"]) == {"unmerged", "merged"}


def test_adalora_reallocates_ranks_within_the_budget(tmp_path, reviews_file):
    from conftest import run_to_dict

    override = validate(RunConfig, {"method": "adalora", "plan": {"placement": "all", "allocation": 4}}, "t")
    config = classification_config(reviews_file, max_steps=40).model_copy(
        update={"method": override.method, "plan": override.plan})
    result = run_to_dict(config, tmp_path / "adalora")
    assert result["status"] == "done"
    ranks = result["method"]["final_ranks"]
    plan = json.loads((tmp_path / "adalora" / "plan.json").read_text())
    assert set(ranks) == {s["path"] for s in plan["sites"]}
    assert len(set(ranks.values())) > 1  # ranks differ across modules
    assert sum(ranks.values()) <= 4 * len(plan["sites"])  # within the plan's rank budget of 4 per module


@pytest.mark.parametrize("kind", ["classification", "instruction"])
def test_qlora_runs_end_to_end_with_an_8bit_optimizer(tmp_path, reviews_file, alpaca_file, kind):
    from conftest import run_to_dict

    model, path = ("tiny-bert", reviews_file) if kind == "classification" else ("tiny-llama", alpaca_file)
    config = validate(RunConfig, {
        "model": model, "task": {"path": str(path), "kind": kind}, "method": "qlora",
        "plan": {"placement": "all", "allocation": 4},
        "train": {"max_steps": 3, "batch_size": 4, "latency_batches": 1, "optimizer": "adamw-8bit"},
    }, "test")
    result = run_to_dict(config, tmp_path / "qlora")
    cost = result["cost"]
    assert result["status"] == "done"
    assert cost["adapter_params"] == cost["plan_params"]
    assert 0 < cost["quantized_weight_bytes"] < cost["frozen_weight_bytes"]
    assert set(cost["latency_ms_per_batch"]) == {"unmerged", "merged"}  # merged: the 16-bit copy
    assert (tmp_path / "qlora" / "adapter" / "adapter_model.safetensors").is_file()


METHODS_ON_LLAMA = ["lora", "qlora", "adalora", "hira", "bottleneck", "prefix", "full"]


@pytest.mark.parametrize("method", METHODS_ON_LLAMA)
def test_cli_runs_every_method_on_tiny_llama(tmp_path, alpaca_file, cli, method):
    code, out, err = cli("run", "--model", "tiny-llama", "--data", alpaca_file, "--kind", "instruction",
                         "--method", method, "--max-steps", 6, "--batch-size", 4, "--generate", 3,
                         "--output", tmp_path / method)
    assert code == 0, err
    result = json.loads((tmp_path / method / "result.json").read_text())
    assert result["status"] == "done" and result["metrics"]["test"]["perplexity"] > 1
    assert result["metrics"]["test"]["generated"] == 3  # every method generates (prefixes through PEFT's cache)
    assert "ROUGE-L" in out
    assert result["config"]["method"]["name"] == method


def test_cli_bitfit_on_llama_is_a_clear_error(tmp_path, alpaca_file, cli):
    code, _, err = cli("run", "--model", "tiny-llama", "--data", alpaca_file, "--kind", "instruction",
                       "--method", "bitfit", "--output", tmp_path / "b")
    assert code == 2 and "bias" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_cli_budget_chooses_the_prefix_length(tmp_path, alpaca_file, cli):
    code, out, err = cli("run", "--model", "tiny-llama", "--data", alpaca_file, "--kind", "instruction",
                         "--method", "prefix", "--budget", 2048, "--max-steps", 2, "--output", tmp_path / "p")
    assert code == 0, err
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert result["budget"] == {"target": 2048, "parameter": "num_virtual_tokens", "size": 8, "params": 2048}
    assert result["cost"]["adapter_params"] == 2048 and result["cost"]["plan_params"] is None
    assert "base" in result["cost"]["latency_ms_per_batch"]  # the prefix's overhead against the bare model
    assert "num_virtual_tokens 8" in out


def test_latency_times_a_fixed_random_sample_of_representative_length():
    from peftlab.train.phases import eval_batches, latency_sample

    split = [{"input_ids": list(range(1, n + 1)), "labels": n % 2} for n in range(1, 201)]  # 1 to 200 tokens
    sample = latency_sample(split, 2, 8, 0)
    again = latency_sample(split, 2, 8, 0)
    assert len(sample) == 2 and [b["input_ids"].shape[0] for b in sample] == [8, 8]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(sample, again))  # the same for every run
    tokens = sum(int(b["attention_mask"].sum()) for b in sample) / 16
    assert 50 < tokens < 150  # the split's mean is 100.5
    shortest = eval_batches(split, 8, 0)[:2]  # what was timed before: 1 to 16 tokens
    assert max(b["input_ids"].shape[1] for b in shortest) == 16
    assert len(latency_sample(split[:5], 2, 8, 0)) == 1  # a split smaller than the sample: all of it, once


def test_cpu_training_memory_is_the_increase_over_the_process():
    import sys

    from peftlab.train.device import memory_in_use, peak_memory, reset_peak_memory

    if not sys.platform.startswith("linux") or torch.cuda.is_available():
        pytest.skip("the resident high-water mark is reset through Linux's /proc")
    before = memory_in_use()
    assert reset_peak_memory()
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    del block
    peak = peak_memory(before)
    assert peak.kind == "rss_increase"
    assert 240 * 2**20 < peak.training < peak.process
    assert reset_peak_memory()
    assert peak_memory(memory_in_use()).training < 64 * 2**20  # a new peak: the block is gone


@pytest.mark.parametrize("method, whole", [({"name": "lora"}, False), ({"name": "lora", "init": "eva"}, True),
                                           ({"name": "sparselora", "sparsity": "auto(0.02)"}, True)])
def test_a_few_steps_tokenize_the_examples_they_draw_unless_the_method_starts_from_the_whole_split(
        reviews_file, method, whole):
    from peftlab.resolve.run import resolve_run

    def config(**train):
        return validate(RunConfig, {"model": "tiny-llama", "task": {"path": str(reviews_file), "kind": "classification"},
                                    "method": method, "train": {"batch_size": 4, **train}}, "test")

    every = len(resolve_run(config()).data.train)
    assert len(resolve_run(config(max_steps=2)).data.train) == (every if whole else 8)


def test_the_cost_section_is_typed_and_reads_other_versions_keys():
    from peftlab.train.result import Costs, RunResult

    written = {"trainable_params": 10, "train_seconds": 1.5, "latency_ms_per_batch": {"merged": 2.0},
               "a_future_cost": 7}
    result = RunResult.from_dict({"status": "done", "cost": written})
    assert result.cost.train_seconds == 1.5 and result.cost.other == {"a_future_cost": 7}
    again = result.to_dict()["cost"]
    assert again["a_future_cost"] == 7 and again["trainable_params"] == 10 and "generated_tokens" not in again
    assert "generated_tokens" in Costs(generated_tokens=3).to_dict()  # written where the run generated
    with pytest.raises(TypeError):
        Costs(train_secnds=1.0)  # a misspelt cost is an error where it is written, not a missing column
