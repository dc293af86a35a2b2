"""Generation-based evaluation: scores, batched generation, the samples file, forgetting."""

import json

import pytest
import torch

from peftlab.config import validate
from peftlab.models.load import load_model, load_tokenizer
from peftlab.specs import GenerateSpec, ModelSpec, RunConfig
from peftlab.tasks.prepare import IGNORE
from peftlab.train.generation import (
    Prompts,
    exact_match,
    generate,
    generation_prompts,
    last_supervised_span,
    normalize_answer,
    rouge_l,
)

pytestmark = pytest.mark.usefixtures("private_cache")


def test_rouge_l_on_hand_made_pairs():
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == [pytest.approx(5 / 6)]
    # LCS "a c" = 2: P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3
    assert rouge_l(["a b c d"], ["a c"]) == [pytest.approx(2 / 3)]
    # tokens are lower-cased alphanumerics: case and punctuation do not count
    assert rouge_l(["Great!"], ["great"]) == [pytest.approx(1.0)]
    assert rouge_l(["", "stone"], ["apple", "river"]) == [0.0, 0.0]


def test_exact_match_normalises_like_squad():
    assert normalize_answer("  The Answer:  Paris! ") == "answer paris"
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("an apple", "Apple") == 1.0
    assert exact_match("great", "other") == 0.0
    assert exact_match("paris france", "paris") == 0.0


def test_the_prompt_is_everything_before_the_last_supervised_span():
    labels = [IGNORE, IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, 9]
    assert last_supervised_span(labels) == (6, 9)
    assert last_supervised_span([IGNORE, 3, IGNORE]) == (1, 2)
    assert last_supervised_span([IGNORE, IGNORE]) is None


class _Tokenizer:
    """What generation_prompts reads of a tokenizer: decoding and the special ids."""

    eos_token_id, sep_token_id, all_special_ids = 2, None, [0, 2]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in self.all_special_ids))


def test_generation_prompts_split_examples_and_stop_at_the_trained_ender():
    examples = [
        {"input_ids": [0, 5, 6, 7, 8, 2], "labels": [IGNORE, IGNORE, IGNORE, 7, 8, 2]},
        {"input_ids": [5, 6], "labels": [5, 6]},  # nothing to prompt with: skipped
        {"input_ids": [0, 9, 10, 11], "labels": [IGNORE, IGNORE, 10, 11]},
    ]
    prompts = generation_prompts(examples, 5, _Tokenizer(), pad_id=0)
    assert prompts.ids == [[0, 5, 6], [0, 9]]
    assert prompts.references == ["w7 w8", "w10 w11"]
    assert prompts.texts == ["w5 w6", "w9"]
    assert prompts.stop_ids == [2]
    assert generation_prompts(examples, 1, _Tokenizer(), pad_id=0).ids == [[0, 5, 6]]


def _peaked(name):
    """A tiny random causal LM whose next-token choices are far from ties (greedy decoding is then stable
    under the float differences of padding)."""
    model = load_model(ModelSpec(name=name, head="causal-lm"), seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_left_padded_batches_generate_what_one_prompt_at_a_time_does(name):
    model = _peaked(name)
    tokenizer = load_tokenizer(ModelSpec(name=name))
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1000, 5000, (n,), generator=generator).tolist() for n in (3, 9, 5, 12, 7)]
    prompts = Prompts(ids, [""] * len(ids), [""] * len(ids), stop_ids=[102], pad_id=0)
    one = generate(model, prompts, GenerateSpec(max_new_tokens=10, batch_size=1), tokenizer, "cpu")
    batched = generate(model, prompts, GenerateSpec(max_new_tokens=10, batch_size=5), tokenizer, "cpu")
    assert batched.texts == one.texts
    assert batched.new_tokens == one.new_tokens == [10] * 5
    assert len(set(batched.texts)) > 1  # the prompts lead to different completions


def alpaca_rows():
    words = ["apple", "river", "stone", "cloud", "maple", "tiger"]
    return [{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in words * 6]


def instruction_config(path, **more):
    return validate(RunConfig, {
        "model": "tiny-llama", "task": {"path": str(path), "kind": "instruction", "max_eval_examples": 6},
        "plan": {"allocation": 4}, "method": {"name": "lora", "dropout": 0.1},  # dropout: training draws randoms
        "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "latency_batches": 0},
        **more,
    }, "test")


def test_the_samples_file_holds_base_and_adapted_completions_and_the_base_is_the_bare_model(tmp_path):
    from conftest import run_to_dict

    from peftlab.methods.registry import make_method
    from peftlab.models.load import head_modules
    from peftlab.resolve.run import resolve_run

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    config = instruction_config(data, eval={"generate": {"examples": 4, "max_new_tokens": 5}})
    result = run_to_dict(config, tmp_path / "run")
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and result["metrics"]["test"]["generated"] == 4
    assert {"prompt", "reference", "base", "adapted", "rouge_l", "exact_match", "base_rouge_l"} <= set(samples[0])
    assert result["metrics"]["test"]["rouge_l"] == pytest.approx(sum(s["rouge_l"] for s in samples) / 4)
    assert result["cost"]["generated_tokens"] > 0 and result["cost"]["generation_tokens_per_second"] > 0
    from peftlab.measures import BY_NAME

    assert set(result["metrics"]["test"]) - {"count"} <= set(BY_NAME)  # every metric a report names is declared

    # generating (the base model's completions come before training) changes nothing the run learns
    plain = run_to_dict(instruction_config(data), tmp_path / "plain")
    assert plain["final_train_loss"] == result["final_train_loss"]
    assert plain["metrics"]["test"]["loss"] == result["metrics"]["test"]["loss"]

    # the base column is the bare model's completion of the same prompts ...
    resolved = resolve_run(config)
    base = load_model(resolved.model, seed=config.train.seed)
    bare = generate(base, resolved.prompts, config.eval.generate, resolved.tokenizer, "cpu")
    assert bare.texts == [s["base"] for s in samples]
    # ... and what the trained adapter gives with its adapters disabled
    method = make_method(resolved.method, resolved.total_steps)
    adapted = method.load(method.apply(load_model(resolved.model, seed=config.train.seed), resolved.plan,
                                       head_modules(base)), tmp_path / "run" / "adapter")
    with adapted.disable_adapter():
        disabled = generate(adapted, resolved.prompts, config.eval.generate, resolved.tokenizer, "cpu")
    assert disabled.texts == bare.texts
    with method.merged(adapted) as merged:  # the run completes with the merged model, as it would be served
        enabled = generate(merged, resolved.prompts, config.eval.generate, resolved.tokenizer, "cpu")
    assert enabled.texts == [s["adapted"] for s in samples]
    assert enabled.texts != disabled.texts  # the adapter learned something that shows in the completions


def test_the_base_completions_cache_tells_apart_the_seeds_that_build_a_tiny_models_weights(tmp_path):
    from conftest import run_to_dict

    from peftlab.resolve.run import resolve_run

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    samples = {}
    for seed in (0, 1):  # seed 0 first: its base completions are in the cache when seed 1 runs
        config = instruction_config(data, eval={"generate": {"examples": 4, "max_new_tokens": 5}},
                                    train={"max_steps": 1, "seed": seed, "latency_batches": 0})
        run_to_dict(config, tmp_path / f"run{seed}")
        samples[seed] = [json.loads(line)["base"] for line in (tmp_path / f"run{seed}" / "samples.jsonl").read_text().splitlines()]
        resolved = resolve_run(config)
        bare = generate(load_model(resolved.model, seed=seed), resolved.prompts, config.eval.generate,
                        resolved.tokenizer, "cpu")
        assert samples[seed] == bare.texts
    assert samples[0] != samples[1]


def test_of_runs_started_together_one_computes_a_base_cache_file_and_the_other_reads_it(tmp_path):
    """`files.exclusive` around the base's completions and benchmark scores: without it both would compute."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from peftlab.files import exclusive, write_atomic

    file = tmp_path / "cache" / "base.json"

    def base_scores(_: int) -> str:
        with exclusive(file):
            if file.is_file():
                return "read"
            time.sleep(0.3)  # the other run starts meanwhile
            write_atomic(file, "{}")
            return "computed"

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(base_scores, range(2))) == ["computed", "read"]


def test_forgetting_is_zero_for_an_adapter_that_stays_at_zero(tmp_path):
    from conftest import run_to_dict

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    text = tmp_path / "general.txt"
    text.write_text("The river runs past the old stone mill, and the maple leaves fall into the water. " * 20)

    def forgetting(lr, name):
        config = instruction_config(data, eval={"forgetting": str(text)}, train={
            "max_steps": 6, "batch_size": 4, "lr": lr, "latency_batches": 0})
        return run_to_dict(config, tmp_path / name)["metrics"]["forgetting"]

    still = forgetting(1e-30, "still")  # B moves by ~1e-30: the adapter adds nothing a float can hold
    assert still["increase"] == 0.0 and still["loss"] == still["base_loss"] > 0
    assert still["count"] > 100
    moved = forgetting(5e-2, "moved")
    assert moved["base_loss"] == still["base_loss"]
    assert moved["increase"] != 0.0


def test_generation_needs_an_instruction_task(tmp_path, reviews_file):
    with pytest.raises(Exception, match="eval.generate, eval.forgetting and eval.benchmarks apply to instruction tasks"):
        validate(RunConfig, {"task": {"path": str(reviews_file), "kind": "classification"},
                             "eval": {"generate": True}}, "test")
