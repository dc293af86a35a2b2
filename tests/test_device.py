"""Device choice (cuda, then mps, then cpu), the autocast each gets, and the methods that cannot run there:
the logic is tested with the available backends given, so every branch runs on this CPU machine."""

import json

import pytest

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.registry import make_method
from peftlab.methods.specs import SPECS
from peftlab.specs import RunConfig
from peftlab.train.device import Backends, attention_implementation, choose_device, mixed_precision

CUDA, MPS, CPU_ONLY = Backends(cuda=True, mps=False, cuda_bf16=True), Backends(cuda=False, mps=True), Backends(False, False)


@pytest.mark.parametrize("backends, expected", [
    (CUDA, "cuda"),
    (MPS, "mps"),
    (Backends(cuda=True, mps=True), "cuda"),  # CUDA first
    (CPU_ONLY, "cpu"),
])
def test_auto_takes_cuda_then_mps_then_cpu(backends, expected):
    assert choose_device("auto", backends) == expected


@pytest.mark.parametrize("requested, backends", [("cpu", CUDA), ("cpu", MPS), ("mps", MPS), ("cuda", CUDA)])
def test_a_named_available_device_is_kept(requested, backends):
    assert choose_device(requested, backends) == requested


@pytest.mark.parametrize("requested, backends, message", [
    ("cuda", MPS, "train.device: cuda is not available on this machine (torch finds mps, cpu)"),
    ("mps", CPU_ONLY, "train.device: mps is not available on this machine (torch finds cpu)"),
    ("tpu", CUDA, "train.device: 'tpu' is not a device; valid: auto, cuda, mps, cpu"),
])
def test_an_unavailable_device_is_one_clear_error(requested, backends, message):
    with pytest.raises(PeftlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_device(requested, backends)


def check_method(device: str, method: str) -> None:
    """`method`: a name, or `lora init X`."""
    name, _, init = method.partition(" init ")
    make_method(SPECS[name].model_validate({"name": name, **({"init": init} if init else {})})).check_device(device)


def test_qlora_is_refused_on_mps_and_runs_elsewhere():
    with pytest.raises(PeftlabError, match="method qlora cannot run on mps: bitsandbytes"):
        check_method("mps", "qlora")
    for device, method in [("mps", "lora"), ("mps", "sparselora"), ("cpu", "qlora"), ("cuda", "qlora"),
                           ("cuda", "lora init loftq"), ("cpu", "lora init pissa")]:
        check_method(device, method)
    for device in ("cpu", "mps"):
        with pytest.raises(PeftlabError, match=f"method lora init loftq cannot run on {device}: PEFT's LoftQ .* CUDA"):
            check_method(device, "lora init loftq")


@pytest.mark.parametrize("requested, device, backends, cpu_bf16, expected", [
    ("auto", "cuda", CUDA, False, "bf16"),
    ("auto", "cuda", Backends(cuda=True, mps=False, cuda_bf16=False), False, "fp16"),
    ("fp16", "cuda", CUDA, False, "fp16"),
    ("auto", "mps", MPS, False, "fp16"),
    ("bf16", "mps", MPS, False, "bf16"),
    ("fp32", "mps", MPS, False, "no"),
    ("auto", "cpu", CPU_ONLY, True, "no"),
    ("native", "cpu", CPU_ONLY, True, "bf16"),
    ("native", "cpu", CPU_ONLY, False, "no"),
    ("bf16", "cpu", CPU_ONLY, False, "bf16"),
    ("auto", "cpu", CUDA, False, "no"),  # train.device cpu on a GPU machine: the CPU's rules
])
def test_mixed_precision_per_device(requested, device, backends, cpu_bf16, expected):
    assert mixed_precision(requested, device, backends, cpu_bf16) == expected


def test_fp16_on_a_cpu_is_refused():
    with pytest.raises(PeftlabError, match="fp16 autocast needs a GPU"):
        mixed_precision("fp16", "cpu", CPU_ONLY, True)


def test_train_device_is_validated_and_recorded(tmp_path, reviews_file, cli):
    with pytest.raises(PeftlabError, match="config: train.device: Input should be 'auto', 'cuda', 'mps' or 'cpu'"):
        validate(RunConfig, {"train": {"device": "gpu"}}, "config")
    code, _, err = cli("run", "--model", "tiny-bert", "--data", reviews_file, "--kind", "classification",
                       "--max-steps", "1", "--output", tmp_path / "x", "--rank", "2")
    assert code == 0, err
    result = json.loads((tmp_path / "x" / "result.json").read_text())
    assert result["environment"]["device"] == "cpu" and result["cost"]["peak_memory_kind"] == "rss_increase"


@pytest.mark.parametrize(("requested", "device", "mixed", "expected"), [
    ("auto", "cpu", "bf16", "eager"),  # torch's CPU flash-attention backward is slow in bf16
    ("auto", "cpu", "no", None),  # transformers' default (sdpa where the model has it)
    ("auto", "cuda", "bf16", None),
    ("sdpa", "cpu", "bf16", "sdpa"),
    ("eager", "cuda", "bf16", "eager"),
])
def test_attention_implementation_per_device(requested, device, mixed, expected):
    assert attention_implementation(requested, device, mixed) == expected


def test_flash_attention_is_refused_without_a_cuda_gpu_in_one_line(tmp_path, reviews_file, cli):
    with pytest.raises(PeftlabError, match="flash_attention_2 needs a CUDA GPU"):
        attention_implementation("flash_attention_2", "cpu", "bf16")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: tiny-bert, attn_implementation: flash_attention_2}}\n"
                      f"task: {{path: {reviews_file}, kind: classification}}\ntrain: {{max_steps: 1}}\n")
    code, _, err = cli("run", "-c", config, "--output", tmp_path / "x")
    assert code == 2 and "model.attn_implementation: flash_attention_2 needs a CUDA GPU" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_attention_kernel_is_used_and_recorded(tmp_path, reviews_file, cli, kernel):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: tiny-bert, attn_implementation: {kernel}}}\n"
                      f"task: {{path: {reviews_file}, kind: classification}}\ntrain: {{max_steps: 1}}\n"
                      "plan: {allocation: 2}\n")
    code, _, err = cli("run", "-c", config, "--output", tmp_path / "x")
    assert code == 0, err
    result = json.loads((tmp_path / "x" / "result.json").read_text())
    assert result["environment"]["attn_implementation"] == kernel
    assert result["environment"]["attn_implementation_forward"] == kernel  # chosen: in every phase


def test_auto_trains_eager_under_bf16_on_a_cpu_and_evaluates_with_sdpa(tmp_path, reviews_file, cli, monkeypatch):
    import peftlab.train.context as context

    monkeypatch.setattr(context, "cpu_has_bf16", lambda: True)  # bf16 autocast runs (slowly) on any CPU
    kernels = []
    evaluate = context.evaluate

    def spying(model, *args, **kwargs):
        kernels.append(model.config._attn_implementation)
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(context, "evaluate", spying)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: tiny-bert\ntask: {{path: {reviews_file}, kind: classification}}\n"
                      "train: {max_steps: 2, precision: native}\nplan: {allocation: 2}\n")
    code, _, err = cli("run", "-c", config, "--output", tmp_path / "x")
    assert code == 0, err
    environment = json.loads((tmp_path / "x" / "result.json").read_text())["environment"]
    assert environment["mixed_precision"] == "bf16"
    assert (environment["attn_implementation"], environment["attn_implementation_forward"]) == ("eager", "sdpa")
    assert kernels and set(kernels) == {"sdpa"}  # validation and test: the forward-only kernel
