"""The GPT-2 family end to end on the instruction track: a local DialoGPT-like directory (GPT-2 architecture,
random weights, a byte-level BPE tokenizer with no pad token, as the real one) runs the shipped
instruct-placement study's configurations unchanged but for size, with generation, and LoRA on the q and v
slices of the fused c_attn."""

import json

import pytest

from peftlab.config import load_spec, set_dotted, validate
from peftlab.specs import RunConfig, StudySpec
from peftlab.studies.grid import expand
from peftlab.studies.shipped import shipped_studies

pytestmark = pytest.mark.usefixtures("private_cache")

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano"]


@pytest.fixture
def dialogpt_like(tmp_path):
    """A GPT-2 model directory: config and safetensors weights (4 layers, width 64) and a GPT-2 tokenizer
    built from vocab.json and merges.txt trained here on the test's own text (no download)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    corpus = [f"Below is an instruction that describes a task. Repeat the word {w}. ### Response: {w}" for w in WORDS]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 20, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    files = tmp_path / "vocab"
    files.mkdir()
    bpe.save_model(str(files))
    tokenizer = GPT2TokenizerFast(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"))
    assert len(tokenizer) > 256 and tokenizer.eos_token == "<|endoftext|>"  # the 256 bytes and merges
    assert tokenizer.pad_token is None  # as DialoGPT's
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = tmp_path / "dialogpt-like"
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_instruct_placement_runs_on_a_local_gpt2_directory_with_generation_and_q_v_slices(tmp_path, dialogpt_like):
    from conftest import run_to_dict

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in WORDS * 6]))
    spec = load_spec(StudySpec, shipped_studies()["instruct-placement"])
    base = spec.base
    set_dotted(RunConfig, base, "model", str(dialogpt_like))
    base["task"] = {**base["task"], "name": None, "path": str(data), "kind": "instruction",
                    "max_train_examples": 24, "max_eval_examples": 6, "max_length": 64}
    set_dotted(RunConfig, base, "train.precision", "fp32")
    set_dotted(RunConfig, base, "eval.generate.examples", 4)
    runs = [r for r in expand(spec.model_copy(update={"base": base, "tune": None})) if r.seed == 0]
    assert sorted(r.axes["placement"] for r in runs) == ["all", "attention", "ffn", "lower-half", "upper-half"]
    q_v = validate(RunConfig, {**runs[0].config, "plan": {**runs[0].config["plan"], "placement": "q,v"}}, "test")

    results = {}
    for label, config in [(r.axes["placement"], RunConfig.model_validate(r.config)) for r in runs] + [("q,v", q_v)]:
        result = run_to_dict(config, tmp_path / "runs" / label)
        assert result["status"] == "done", result["error"]
        test = result["metrics"]["test"]
        assert test["generated"] == 4 and 0 <= test["rouge_l"] <= 1 and "base_rouge_l" in test
        assert (tmp_path / "runs" / label / "samples.jsonl").is_file()
        results[label] = result
    # LoRA on q and v writes only their slices of c_attn: r x (64 in + 64 out) per slice, 2 slices x 4 layers
    assert results["q,v"]["cost"]["adapter_params"] == 16 * (64 + 64) * 2 * 4
    plan = json.loads((tmp_path / "runs" / "q,v" / "plan.json").read_text())
    assert {s["role"] for s in plan["sites"]} == {"attn.q", "attn.v"}
    # attention-only adapts c_attn and attn.c_proj, never mlp.c_proj (the suffix trap of GPT-2)
    attention = json.loads((tmp_path / "runs" / "attention" / "plan.json").read_text())
    assert not any("mlp" in s["path"] for s in attention["sites"])
    assert results["all"]["cost"]["adapter_params"] > results["attention"]["cost"]["adapter_params"]
