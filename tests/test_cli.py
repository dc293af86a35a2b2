"""`peftlab plan` from the command line: the must-show commands and one clear line on bad input."""

import json
import subprocess
import sys

import pytest


def test_tiny_gpt2_attention_table(cli):
    code, out, _ = cli("plan", "--model", "tiny-gpt2", "--placement", "attention", "--rank", "8")
    assert code == 0
    assert "transformer.h.1.attn.c_attn" in out and "transformer.h.1.attn.c_proj" in out
    assert "mlp.c_proj" not in out
    assert "trainable parameters: 6,144" in out


def test_dialogpt_medium_ffn_json_offline():
    # A real subprocess, as a user runs it: offline, no weights, the full 24-layer model on meta.
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "plan", "--model", "dialogpt-medium", "--placement", "ffn", "--rank", "16", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["totals"]["sites"] == 48
    # per layer: c_fc 1024->4096 and mlp.c_proj 4096->1024, both 16 x (1024 + 4096)
    assert data["totals"]["trainable_params"] == 24 * 2 * 16 * (1024 + 4096)
    assert data["totals"]["base_params"] == 354_823_168
    assert {s["role"] for s in data["sites"]} == {"ffn.up", "ffn.down"}


def test_config_file_with_flag_overrides(tmp_path, cli):
    config = tmp_path / "plan.yaml"
    config.write_text("model: tiny-llama\nplan:\n  placement: {roles: attention, layers: upper-half}\n  allocation: linear(8->4)\n")
    out_file = tmp_path / "out" / "plan.json"
    code, out, _ = cli("plan", "--config", str(config), "--alpha", "16", "--json", "--output", str(out_file))
    assert code == 0
    data = json.loads(out)
    assert json.loads(out_file.read_text()) == data
    assert sorted({s["layer"] for s in data["sites"]}) == [2, 3]
    assert [s["rank"] for s in data["sites"] if s["role"] == "attn.q"] == [8, 4]
    assert {s["alpha"] for s in data["sites"]} == {16.0}


def test_ambiguous_module_name_warns_on_stderr(cli):
    code, _, err = cli("plan", "--model", "tiny-gpt2", "--modules", "c_attn,c_proj")
    assert code == 0
    assert "warning: module name 'c_proj' is ambiguous" in err


BAD_INPUT = [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny-bert", "--placement", "everything"], "plan.placement.roles: unknown role 'everything'"),
    (["--model", "tiny-bert", "--allocation", "quadratic(3)"], "unknown allocation 'quadratic'"),
    (["--model", "tiny-bert", "--layers", "middle"], "unknown layer selector 'middle'"),
    (["--model", "tiny-bert", "--rank", "0"], "plan.allocation.rank: Input should be greater than or equal to 1"),
    (["--model", "tiny-bert", "--rank", "65"], "rank 65 at bert.encoder.layer.0.attention.self.query"),
    (["--model", "tiny-bert", "--layers", "2"], "layer index 2 is out of range; the model has 2 layers (0-1)"),
    (["--model", "tiny-bert", "--placement", "gate"], "placement matches no site"),
    (["--model", "tiny-bert", "--modules", "c_attn"], "placement.modules: 'c_attn' matches no adaptable module"),
    (["--model", "tiny-bert", "--alpha", "lots"], "invalid alpha 'lots'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_gets_one_line_and_exit_2(cli, args, message):
    code, out, err = cli("plan", *args)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: tiny-bert\nplan: [unclosed\n", "malformed YAML"),
        ("model: tiny-bert\nplan:\n  allocaton: 8\n", "plan.allocaton: unknown field"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
        ("model: tiny-bert\nplan:\n  allocation: {kind: linear, first: 8}\n", "plan.allocation.last: Field required"),
    ],
)
def test_bad_yaml_names_the_file_and_field(tmp_path, cli, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    output = tmp_path / "plan.json"
    code, _, err = cli("plan", "--config", str(config), "--output", str(output))
    assert code == 2
    assert str(config) in err and message in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not output.exists()  # nothing half-written


def test_missing_config_file(tmp_path, cli):
    code, _, err = cli("plan", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: no such file" in err


def test_models_lists_presets_and_catalog(cli):
    code, out, _ = cli("models")
    assert code == 0
    for name in ("minilm-l6", "gemma-3-270m", "tiny-llama", "llama-3-8b", "dialogpt-medium"):
        assert name in out


def test_run_help_names_every_registered_method(cli, monkeypatch):
    from peftlab.methods.registry import METHODS

    monkeypatch.setenv("COLUMNS", "400")  # one line per option: the names are not wrapped apart
    code, out, _ = cli("run", "--help")
    assert code == 0 and all(name in out for name in METHODS) and "sparselora" in out
