"""Eval loss is token-weighted over the split, and perplexity == exp(eval loss)."""

import math

import pytest
import torch
import torch.nn.functional as F

from peftlab.models.load import load_model
from peftlab.specs import ModelSpec
from peftlab.tasks.kinds import macro_f1
from peftlab.tasks.prepare import IGNORE, collate
from peftlab.train.evaluate import evaluate


def examples():
    g = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in [(30, 20), (6, 2), (17, 9), (4, 1), (25, 5)]:  # uneven lengths, masked prompts
        ids = torch.randint(1000, 3000, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_perplexity_is_exp_of_token_weighted_loss(name):
    model = load_model(ModelSpec(name=name, head="causal-lm"), seed=0).eval()
    with torch.no_grad():  # sharpen the random model's predictions so per-token losses differ widely
        model.get_output_embeddings().weight.mul_(30)
    rows = examples()
    # Reference: each example alone, full logits, every supervised next token weighted equally.
    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(row["labels"][1:])
            keep = targets != IGNORE
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    batches = [collate(rows[i : i + 2], pad_id=0) for i in range(0, len(rows), 2)]
    metrics = evaluate(model, batches, "instruction", 0, "cpu")
    assert metrics["count"] == count
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == math.exp(metrics["loss"])
    # and it is not the mean of per-batch means, which weights short batches more
    for batch in batches:
        batch_means.append(evaluate(model, [batch], "instruction", 0, "cpu")["loss"])
    assert abs(sum(batch_means) / len(batch_means) - metrics["loss"]) > 1e-2


def test_macro_f1_by_hand():
    # class 0: tp=2 fp=1 fn=0 -> 0.8; class 1: tp=1 fp=0 fn=1 -> 2/3
    assert macro_f1([0, 0, 0, 1], [0, 0, 1, 1], 2) == pytest.approx((0.8 + 2 / 3) / 2)
