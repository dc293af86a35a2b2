"""Prefix and prompt tuning (PEFT) on tiny causal LMs, through peftlab's supervised-positions loss."""

import pytest
import torch
from conftest import make_plan
from peft import PeftModel

from peftlab.errors import PeftlabError
from peftlab.methods.base import trainable_counts
from peftlab.methods.registry import make_method
from peftlab.methods.specs import PrefixSpec
from peftlab.models.load import load_model
from peftlab.specs import ModelSpec
from peftlab.train.loss import batch_nll

CAUSAL = ["tiny-gpt2", "tiny-llama"]


def tiny(name):
    return load_model(ModelSpec(name=name, head="causal-lm"), seed=0)


def batch():
    ids = torch.randint(200, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long), "labels": ids.clone()}


def loss(model, method=None):
    """The causal-LM loss through the method's forward (the prompt in front), or the backbone's."""
    nll, count, _ = batch_nll(model, batch(), "instruction", method.hidden_states if method else None)
    return nll / count


def applied(name, **spec):
    method = make_method(PrefixSpec(num_virtual_tokens=4, **spec))
    return method, method.apply(tiny(name), make_plan(name), [])


@pytest.mark.parametrize("name", CAUSAL)
def test_counts_are_the_prefix_size(name):
    config = tiny(name).config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_width = config.hidden_size // config.num_attention_heads * kv_heads
    _, prefix = applied(name)
    assert trainable_counts(prefix, [])["adapter"] == 4 * layers * 2 * kv_width  # a key and a value per layer
    _, prompt = applied(name, variant="prompt")
    assert trainable_counts(prompt, [])["adapter"] == 4 * config.hidden_size  # one embedding per virtual token


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("variant", ["prefix", "prompt"])
def test_loss_falls_and_only_the_prefix_changes(name, variant):
    torch.manual_seed(0)
    method, model = applied(name, variant=variant)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.3, 0.0))
    model.train()
    losses = []
    for _ in range(20):
        value = loss(model, method)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(value.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("name", CAUSAL)
def test_bypassed_is_the_bare_base_and_save_load_round_trips(name, tmp_path):
    base_loss = loss(tiny(name).eval())
    method, model = applied(name, projection=True, projection_hidden=16)
    model.eval()
    with torch.no_grad():
        with_prefix = loss(model, method)
        with method.bypassed(model):
            assert torch.allclose(loss(model, method), base_loss, atol=1e-6)
    assert not torch.allclose(with_prefix, base_loss, atol=1e-4)  # the prefix changes what is predicted
    method.save(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny(name), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(loss(loaded, method), with_prefix, atol=1e-5)


def test_encoders_are_a_clear_error():
    model = load_model(ModelSpec(name="tiny-bert", head="sequence-classification"))
    with pytest.raises(PeftlabError, match="method prefix: for causal language models"):
        make_method(PrefixSpec()).apply(model, make_plan("tiny-bert"), ["classifier"])


def greedy_reference(model, method, prompt, n_new):
    """Greedy decoding without a cache through the training forward (`method.hidden_states`): the tokens
    generation must reproduce."""
    ids = list(prompt)
    for _ in range(n_new):
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        hidden = method.hidden_states(model, batch)
        ids.append(int(model.get_output_embeddings()(hidden[:, -1]).argmax(-1)))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("variant", ["prefix", "prompt"])
def test_generation_uses_the_learned_prefix_or_prompt(name, variant):
    from peftlab.specs import GenerateSpec
    from peftlab.train.generation import Prompts, generate

    method, model = applied(name, variant=variant)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(1000, 5000, (n,), generator=generator).tolist() for n in (3, 9, 5)]
    prompts = Prompts(ids, [""] * 3, [""] * 3, stop_ids=[-1], pad_id=0)

    class Tokens:  # decoding as the ids themselves
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    with torch.no_grad():
        adapted = generate(model, prompts, GenerateSpec(max_new_tokens=6, batch_size=3), Tokens(), "cpu", complete=method.complete)
        expected = [" ".join(map(str, greedy_reference(model, method, p, 6))) for p in ids]
        with method.bypassed(model):
            base = generate(model, prompts, GenerateSpec(max_new_tokens=6, batch_size=3), Tokens(), "cpu", complete=method.complete)
    assert adapted.texts == expected
    assert base.texts != adapted.texts  # the prefix changes what is generated
