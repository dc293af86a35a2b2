"""Speed features: length-bucketed batches and the frozen-prefix activation cache."""

import json
from contextlib import nullcontext

import pytest
import torch
from conftest import run_to_dict

import peftlab.train.context as run_module
from peftlab.config import validate
from peftlab.methods.registry import make_method
from peftlab.models.load import count_params, head_modules, load_model
from peftlab.models.sites import layer_blocks, resolve_sites
from peftlab.plans.plan import build_plan
from peftlab.specs import ModelSpec, RunConfig
from peftlab.tasks.prepare import collate
from peftlab.train.batching import Batches
from peftlab.train.loss import batch_nll
from peftlab.train.speed.compile import CompiledLayers
from peftlab.train.speed.head_positions import last_layer_at_head
from peftlab.train.speed.prefix_cache import build_prefix_cache, lowest_trainable_layer

pytestmark = pytest.mark.usefixtures("private_cache")  # a cache of its own per test


@pytest.fixture
def no_dropout(monkeypatch):
    """Models without dropout: a run is then deterministic given its batches, so the cached and the
    uncached run must produce the same losses."""
    original = run_module.load_model

    def load(*args, **kwargs):
        model = original(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    monkeypatch.setattr(run_module, "load_model", load)


@pytest.fixture
def varied_reviews(tmp_path):
    """Reviews of 5 to 25 words: lengths vary, so batches carry padding."""
    rows = [{"text": f"the food was {'good' if i % 2 else 'bad'} " + "very " * (i % 21), "label": "pos" if i % 2 else "neg"}
            for i in range(120)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def instructions(tmp_path):
    rows = [{"instruction": f"Repeat the word {w} {'twice ' * (i % 5)}.", "input": "", "output": f"{w} " * (1 + i % 3)}
            for i, w in enumerate(["apple", "river", "stone", "cloud"] * 6)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


def test_bucketed_batches_cover_every_example_once_and_reshuffle():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    sampler = Batches(lengths, 16, seed=3, bucketed=True)
    first, second = list(sampler), list(sampler)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(1000))
        assert len(epoch) == len(sampler) == 63
    assert first != second  # a fresh mix every epoch
    assert list(Batches(lengths, 16, seed=3, bucketed=True)) == first  # seeded

    def padding(batches):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    random_batches = list(Batches(lengths, 16, seed=3, bucketed=False))
    assert padding(first) < 0.05 < 0.3 < padding(random_batches)


def run_losses(tmp_path, model, data, kind, placement, cache, name, **train):
    config = validate(RunConfig, {
        "model": model,
        "task": {"path": str(data), "kind": kind},
        "plan": {"placement": placement, "allocation": 4},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 5e-3, "latency_batches": 0, "log_every": 1,
                  "prefix_cache": cache, **train},
    }, "test")
    out = tmp_path / name
    result = run_to_dict(config, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], result


UPPER = {"roles": "all", "layers": "upper-half"}


@pytest.mark.parametrize("model,kind", [("tiny-bert", "classification"), ("tiny-distilbert", "classification"),
                                        ("tiny-gpt2", "classification"), ("tiny-llama", "instruction"),
                                        ("tiny-gpt2", "instruction")])
def test_cached_prefix_gives_the_uncached_losses(tmp_path, no_dropout, varied_reviews, instructions, model, kind):
    data = varied_reviews if kind == "classification" else instructions
    plain, plain_result = run_losses(tmp_path, model, data, kind, UPPER, False, "plain")
    cached, result = run_losses(tmp_path, model, data, kind, UPPER, True, "cached")
    layers = 4 if model == "tiny-llama" else 2
    assert plain_result["speed"].get("prefix_cache") is None
    assert result["speed"]["prefix_cache"]["layer"] == layers // 2 and not result["speed"]["prefix_cache"]["loaded"]
    assert result["speed"]["prefix_cache"]["examples"] == result["data"]["train"]
    assert cached == pytest.approx(plain, abs=1e-5)
    assert result["metrics"]["test"]["loss"] == pytest.approx(plain_result["metrics"]["test"]["loss"], abs=1e-5)
    assert len(set(cached)) > 1  # the loss moved: the steps trained something


def test_a_second_run_loads_the_cache_and_trains_the_same(tmp_path, no_dropout, varied_reviews):
    first, one = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "one")
    second, two = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "two")
    assert not one["speed"]["prefix_cache"]["loaded"] and two["speed"]["prefix_cache"]["loaded"]
    assert two["speed"]["prefix_cache"]["file"] == one["speed"]["prefix_cache"]["file"]
    assert second == first
    # another seed of a tiny model has other lower weights: its own cache
    _, other = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "three", seed=1)
    assert other["speed"]["prefix_cache"]["file"] != one["speed"]["prefix_cache"]["file"]


def test_bucketing_reports_less_padding(tmp_path, varied_reviews):
    epoch = {"max_steps": None, "epochs": 1}
    _, bucketed = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", "all", True, "b", **epoch)
    _, plain = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", "all", True, "r", batching="random",
                          **epoch)
    assert bucketed["speed"]["prefix_cache"] is None  # adapters on layer 0: nothing to skip
    assert bucketed["cost"]["padding_fraction"] < plain["cost"]["padding_fraction"]
    assert bucketed["cost"]["train_tokens"] == plain["cost"]["train_tokens"]  # one epoch: every example once


def adapted(model_name, method, placement):
    spec = ModelSpec(name=model_name, head="sequence-classification")
    model = load_model(spec)
    plan = build_plan(resolve_sites(model), count_params(model), validate(RunConfig, {"plan": {"placement": placement}},
                                                                            "test").plan, model_name)
    return make_method(validate(RunConfig, {"method": method}, "test").method, 10).apply(model, plan, head_modules(model))


def test_no_cache_when_something_trainable_runs_below_the_lowest_adapter():
    example = [{"input_ids": [101, 2000, 2001, 102], "labels": 0}]

    def cache(model):
        return build_prefix_cache(model, example, "k", 0, 4, torch.device("cpu"), nullcontext, "no")

    upper = adapted("tiny-bert", "lora", UPPER)
    assert lowest_trainable_layer(upper) == 1
    embeddings = upper.get_base_model().bert.embeddings.word_embeddings.weight
    embeddings.requires_grad_(True)
    assert cache(upper) == (None, None)  # a trainable embedding feeds the cached layers
    assert lowest_trainable_layer(adapted("tiny-bert", "full", "all")) == 0
    assert lowest_trainable_layer(adapted("tiny-bert", "lora", "all")) == 0


def test_the_prefix_cache_steps_aside_for_sharded_layers(private_cache):
    """Sharded layers: every process would have to compute the frozen ones together, so no cache; unsharded, the
    same model caches its lower layer."""
    from peftlab.train.speed.base import RunSetting
    from peftlab.train.speed.prefix_cache import PrefixCacheFeature

    model = adapted("tiny-bert", "lora", UPPER)
    for module in model.modules():  # a cache is exact only without dropout below the adapters
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    method = make_method(validate(RunConfig, {"method": "lora"}, "test").method, 10)
    examples = [{"input_ids": [101, 2000, 2001, 102], "labels": 0, "index": 0}]
    settings = {sharded: RunSetting("classification", examples, "k", 0, 4, torch.device("cpu"), nullcontext, "no",
                                    sharded=sharded) for sharded in (True, False)}
    assert PrefixCacheFeature().install(model, method, settings[True]) == {
        "used": False, "note": "off: the layers are sharded over the processes, which would all have to build it"}
    assert PrefixCacheFeature().install(model, method, settings[False])["used"] is True


def test_compiled_layers_train_like_eager_ones(tmp_path, no_dropout, varied_reviews):
    eager, _ = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", "all", False, "eager")
    compiled, result = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", "all", False, "compiled",
                                  compile=True)
    assert result["status"] == "done" and result["config"]["train"]["compile"]
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_a_cache_too_large_for_memory_is_skipped_with_a_note(tmp_path, no_dropout, varied_reviews, monkeypatch):
    import peftlab.train.speed.prefix_cache as prefix_cache

    monkeypatch.setattr(prefix_cache, "memory_limit", lambda: 1000)  # bytes
    _, result = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "big")
    assert result["status"] == "done" and not result["speed"]["prefix_cache"]["used"]
    assert "quarter of this machine's memory" in result["speed"]["prefix_cache"]["note"]


def test_compile_wraps_every_layer_block():
    model = load_model(ModelSpec(name="tiny-llama", head="causal-lm"))
    CompiledLayers().install(model, None, None)
    assert [layer._compiled_call_impl is not None for layer in model.model.layers] == [True] * 4
    phi3 = load_model(ModelSpec(name="tiny-phi3", head="causal-lm"))
    CompiledLayers().install(phi3, None, None)
    assert all(layer._compiled_call_impl is not None for layer in phi3.model.layers)


def test_compile_on_a_model_without_a_family_names_every_family():
    from transformers import OPTConfig, OPTForCausalLM

    from peftlab.errors import PeftlabError
    from peftlab.models.architectures import FAMILIES

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(PeftlabError, match="layer blocks of 'opt'") as refused:
        CompiledLayers().install(model, None, None)
    assert all(family.name in str(refused.value) for family in FAMILIES)  # phi3 too


@pytest.mark.parametrize("model_name,after", [("tiny-bert", "output"), ("tiny-distilbert", "ffn")])
def test_last_layer_at_head_gives_the_full_forwards_logits_and_gradients(model_name, after):
    model = adapted(model_name, "lora", "all").eval()  # eval: no dropout, so both forwards are deterministic
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init: give the adapters an effect
            p.data.normal_(0, 0.1)
    batch = collate([{"input_ids": [101] + [2000 + 7 * i + j for j in range(3 + 2 * i)] + [102], "labels": i % 2}
                     for i in range(6)], 0)  # lengths 5 to 15: padded rows too
    batch.pop("index", None)
    seen = []
    last = layer_blocks(model)[0][-1]
    last.get_submodule(after).register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))

    def forward_and_grads():
        model.zero_grad()
        nll, count, logits = batch_nll(model, batch, "classification")
        (nll / count).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_logits, full_grads = forward_and_grads()
    handle = last_layer_at_head(model, "classification", make_method(validate(RunConfig, {}, "test").method, 10))
    assert handle is not None
    logits, grads = forward_and_grads()
    handle.remove()
    assert seen == [(6, batch["input_ids"].shape[1], 64), (6, 1, 64)]  # the last layer's FFN ran at [CLS] only
    assert torch.allclose(logits, full_logits, atol=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) > 2
    for name, grad in grads.items():
        assert torch.allclose(grad, full_grads[name], atol=1e-6), name


def test_last_layer_at_head_applies_to_encoder_classification_only():
    def method(name):
        return make_method(validate(RunConfig, {"method": name}, "test").method, 10)

    lora, sparse = method("lora"), method("sparselora")
    assert last_layer_at_head(adapted("tiny-bert", "lora", "all"), "classification", lora) is not None
    assert last_layer_at_head(adapted("tiny-bert", "lora", "all"), "classification", sparse) is None  # routes positions
    assert last_layer_at_head(adapted("tiny-distilbert", "lora", "all"), "classification", lora) is not None
    # bottleneck adapters wrap the output projections: the sliced module is still found
    assert last_layer_at_head(adapted("tiny-distilbert", "bottleneck", "all"), "classification", method("bottleneck"))
    assert last_layer_at_head(adapted("tiny-gpt2", "lora", "all"), "classification", lora) is None  # reads the last token
    assert last_layer_at_head(adapted("tiny-bert", "lora", "all"), "instruction", lora) is None


def test_runs_with_and_without_last_layer_at_head_learn_the_same(tmp_path, no_dropout, varied_reviews):
    trimmed, on = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", "all", False, "on",
                             latency_batches=1)
    full, off = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", "all", False, "off",
                           latency_batches=1, last_layer_at_head=False)
    assert on["speed"]["last_layer_at_head"]["used"] and "last_layer_at_head" not in off["speed"]
    assert trimmed == pytest.approx(full, abs=1e-5) and len(set(full)) > 1
    assert on["metrics"]["test"]["loss"] == pytest.approx(off["metrics"]["test"]["loss"], abs=1e-5)
    assert on["metrics"]["test"]["accuracy"] == off["metrics"]["test"]["accuracy"]
    assert set(on["cost"]["latency_ms_per_batch"]) == {"unmerged", "merged"}


def test_dropout_below_the_adapters_turns_the_cache_off_so_nothing_learned_changes(tmp_path, varied_reviews):
    # tiny-bert keeps BERT's dropout (0.1): a cache would compute layer 0 without it, which the uncached
    # run does not; placement would then be confounded with regularization
    plain, plain_result = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, False, "plain")
    cached, result = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "cached")
    assert not result["speed"]["prefix_cache"]["used"]
    assert "dropout runs below layer 1" in result["speed"]["prefix_cache"]["note"]
    assert cached == plain
    assert result["metrics"]["test"]["loss"] == plain_result["metrics"]["test"]["loss"]
    # every dropout of the model at 0 (for every configuration compared): the cache is exact, and used
    _, zero = run_losses(tmp_path, {"name": "tiny-bert", "dropout": 0.0}, varied_reviews, "classification", UPPER,
                         True, "zero")
    assert zero["speed"]["prefix_cache"]["used"]


def test_model_dropout_sets_every_dropout_of_the_model():
    for name in ("tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-llama"):
        model = load_model(ModelSpec(name=name, dropout=0.0))
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert all(getattr(m, "attention_dropout", 0.0) == 0 for m in model.modules())
    model = load_model(ModelSpec(name="tiny-bert", dropout=0.25))
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}


def test_building_the_cache_is_not_training_time(tmp_path, no_dropout, varied_reviews, monkeypatch):
    from types import SimpleNamespace

    import peftlab.train.speed.prefix_cache as prefix_cache

    ticks = iter(range(0, 10**9, 1000))  # every clock reading in the cache code is 1,000 s after the last
    monkeypatch.setattr(prefix_cache, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    _, built = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "built")
    _, loaded = run_losses(tmp_path, "tiny-bert", varied_reviews, "classification", UPPER, True, "loaded")
    assert not built["speed"]["prefix_cache"]["loaded"] and loaded["speed"]["prefix_cache"]["loaded"]
    assert built["speed"]["prefix_cache"]["build_seconds"] == 1000
    for result in (built, loaded):  # the seed that built the cache is not charged for it
        cost = result["cost"]
        assert cost["train_seconds"] < 1000 and "step_seconds" not in cost  # one key for the time of the steps
        assert cost["tokens_per_second"] == pytest.approx(cost["train_tokens"] / cost["train_seconds"])
