"""End to end on the real bundled model and data: LoRA on attention at r=8, one epoch on 2 CPU cores."""

import pytest

from peftlab.config import validate
from peftlab.specs import RunConfig


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 4.5 minutes alone on 2 cores; generous for a shared, noisy machine
def test_minilm_attention_lora_beats_the_majority_class(tmp_path, monkeypatch):
    from conftest import run_to_dict

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    config = validate(RunConfig, {"model": "minilm-l6", "task": "reviews",
                                  "plan": {"placement": "attention", "allocation": 8}}, "test")
    result = run_to_dict(config, tmp_path / "run")
    assert result["status"] == "done"
    assert result["data"]["test"] == 1000
    assert result["metrics"]["test"]["accuracy"] >= 0.80  # majority class: 65.8%
    assert result["cost"]["adapter_params"] == 6 * 4 * 8 * (384 + 384)
    print("minilm-l6 + reviews:", result["metrics"]["test"], result["cost"]["train_seconds"], "s")
