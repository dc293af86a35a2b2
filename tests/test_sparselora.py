"""SparseLoRA: exactness at sparsity 0, FLOPs at sparsity s, dense output tokens, schedule, estimator cache."""

import pytest
import torch
from conftest import make_plan
from peft.tuners.tuners_utils import BaseTunerLayer

from peftlab.config import validate
from peftlab.errors import PeftlabError
from peftlab.methods.registry import make_method
from peftlab.methods.sparselora import layer_sparsity
from peftlab.methods.sparselora.channels import AttentionBlock, SparseProjection, SparseState, SplitFfn
from peftlab.methods.specs import LoraSpec, SparseLoraSpec
from peftlab.models.load import count_params, head_modules, load_model, unwrap
from peftlab.models.sites import resolve_sites
from peftlab.plans.plan import build_plan
from peftlab.specs import ModelSpec, PlanSpec
from peftlab.train.loss import batch_nll

ARCHS = [("tiny-gpt2", "causal-lm"), ("tiny-bert", "sequence-classification"),
         ("tiny-distilbert", "sequence-classification"), ("tiny-llama", "causal-lm")]
EVERY_CHANNEL = 1e-9  # sparsity so small that every channel is kept, through the sparse code path

pytestmark = pytest.mark.usefixtures("private_cache")  # a cache of its own per test


def batch_for(head, context=10, length=16):
    ids = torch.randint(200, 2000, (3, length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][2, -3:] = 0  # one padded row
    if head == "sequence-classification":
        batch["labels"] = torch.tensor([0, 1, 0])
    else:
        labels = ids.clone()
        labels[:, :context] = -100
        labels[2, -3:] = -100
        batch["labels"] = labels
    return batch


@torch.no_grad()
def trained_looking(model):
    """LoRA B random instead of zero, so the LoRA branch matters; the model in training mode."""
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return model.train()


def applied(name, head, spec, placement="all"):
    torch.manual_seed(0)
    base = load_model(ModelSpec(name=name, head=head), seed=0)
    method = make_method(spec)
    model = method.apply(base, make_plan(name, placement=placement, allocation=4), head_modules(base))
    return trained_looking(model), method


def loss_and_grads(model, method, batch, head):
    kind = "classification" if head == "sequence-classification" else "instruction"
    method.prepare_batch(batch)
    nll, count, _ = batch_nll(model, batch, kind)
    (nll / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (nll / count).item(), grads


@pytest.mark.parametrize("name, head", ARCHS)
def test_sparsity_zero_equals_dense_lora(name, head):
    batch = batch_for(head)
    lora, lora_method = applied(name, head, LoraSpec())
    dense_loss, dense_grads = loss_and_grads(lora, lora_method, batch, head)
    model, method = applied(name, head, SparseLoraSpec(ffn_sparsity=EVERY_CHANNEL, attention_sparsity=EVERY_CHANNEL,
                                                       profile="uniform", sparse_outputs=True))
    assert len(method.blocks) == 2 * len(method.sparsity["ffn"])  # every FFN and attention wrapped
    loss, grads = loss_and_grads(model, method, batch, head)
    assert loss == pytest.approx(dense_loss, abs=1e-5)
    assert grads.keys() == dense_grads.keys() and len(grads) > 0
    for n, g in grads.items():
        assert torch.allclose(g, dense_grads[n], atol=1e-5), n
    assert method.state.flops.estimator > 0  # the sparse path (estimator, gathers, scatters) did run
    assert method.state.flops.executed == method.state.flops.dense


def test_sparsity_exactly_zero_wraps_nothing():
    _, method = applied("tiny-llama", "causal-lm", SparseLoraSpec(ffn_sparsity=0, attention_sparsity=0))
    assert method.blocks == []


@pytest.mark.parametrize("name, head", ARCHS)
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_executed_ffn_flops_fall_with_sparsity(name, head, sparsity):
    model, method = applied(name, head, SparseLoraSpec(ffn_sparsity=sparsity, attention_sparsity=0, profile="uniform",
                                                       sparse_outputs=True))
    loss_and_grads(model, method, batch_for(head), head)
    width = method.blocks[0].down.in_features
    kept = round((1 - sparsity) * width)
    flops = method.state.flops
    assert flops.executed / flops.dense == pytest.approx(kept / width)
    assert flops.executed < flops.dense
    method.on_step(model, 1, 1)
    report = method.report(model)["flops"]
    assert report["executed_share"] == pytest.approx((flops.executed + flops.estimator) / flops.dense)
    # over every projection: the attention ran dense, on all 3 x 16 rows of the batch
    sites = [s for s in resolve_sites(load_model(ModelSpec(name=name, head=head), seed=0)).sites if not s.is_slice]
    every = 3 * 16 * sum(2 * s.in_features * s.out_features for s in sites)
    assert report["all_projections_share"] == pytest.approx(1 - (flops.dense - flops.executed - flops.estimator) / every)
    assert report["executed_share"] < report["all_projections_share"] < 1


def test_attention_flops_on_fused_gpt2_and_gqa_llama():
    for name in ("tiny-gpt2", "tiny-llama"):
        model, method = applied(name, "causal-lm", SparseLoraSpec(ffn_sparsity=0, attention_sparsity=0.5,
                                                                  profile="uniform", sparse_outputs=True))
        loss_and_grads(model, method, batch_for("causal-lm"), "causal-lm")
        flops = method.state.flops
        assert flops.executed / flops.dense == pytest.approx(0.5)  # q, k, v and o each on half their channels


def test_gqa_channels_map_to_every_query_head_of_their_group():
    # 2 key/value heads of 4 channels, 2 query heads per group: kv channel 5 (head 1, offset 1)
    # feeds query heads 2 and 3 at offset 1 -> query channels 9 and 13
    kept = AttentionBlock._expand(torch.tensor([0, 5]), head_dim=4, groups=2)
    assert kept.tolist() == [0, 4, 9, 13]


def test_output_tokens_run_dense():
    # FFN sparsity in the last layer only: an output token's FFN there runs dense, so its final hidden
    # state equals dense LoRA's; context tokens' differ (they ran on half the channels)
    spec = SparseLoraSpec(ffn_sparsity=0, attention_sparsity=0, layers={3: {"ffn": 0.5}})
    batch = batch_for("causal-lm")
    hidden = {}
    for label, s in (("dense", LoraSpec()), ("sparse", spec)):
        model, method = applied("tiny-llama", "causal-lm", s)
        method.prepare_batch(batch)
        backbone = unwrap(model).model
        hidden[label] = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    supervised = batch["labels"] != -100
    dense = supervised.clone()
    dense[:, :-1] |= supervised[:, 1:]  # the last context token predicts the first output token
    assert torch.allclose(hidden["sparse"][dense], hidden["dense"][dense], atol=1e-5)
    context = ~dense & batch["attention_mask"].bool()
    assert not torch.allclose(hidden["sparse"][context], hidden["dense"][context], atol=1e-3)


def test_projection_rows_of_dense_tokens_equal_the_base():
    base = torch.nn.Linear(8, 6)
    state = SparseState(active=True)

    class Half(AttentionBlock):  # a block that always keeps channels 0..2
        def kept(self, projection, x):
            return torch.tensor([0, 1, 2])

    block = Half(0, 0.5, state, 1, None)
    projection = SparseProjection(base, "out", block, [])
    mask = torch.ones(2, 5, dtype=torch.long)
    for first_dense in (3, 1):  # fewer dense tokens than sparse ones, and more
        dense = torch.zeros(2, 5, dtype=torch.bool)
        dense[:, first_dense:] = True
        state.route(mask, dense)
        x = torch.randn(2, 5, 8, requires_grad=True)
        out = projection(x)
        assert torch.allclose(out[dense], base(x)[dense], atol=1e-6)
        assert torch.allclose(out[~dense][:, :3], base(x)[~dense][:, :3], atol=1e-6)
        assert torch.all(out[~dense][:, 3:] == 0)
        out.sum().backward()  # a sparse token's input gradient sees only the kept rows of W
        expected = torch.where(dense[..., None], base.weight.sum(0), base.weight[:3].sum(0)).detach()
        assert torch.allclose(x.grad, expected, atol=1e-6)


def test_first_steps_run_dense():
    model, method = applied("tiny-llama", "causal-lm", SparseLoraSpec(profile="uniform", dense_fraction=0.5))
    method.total_steps = 4
    method.dense_steps = 2
    method.state.active = False
    batch = batch_for("causal-lm")
    for step in range(1, 5):
        loss_and_grads(model, method, batch, "causal-lm")
        method.on_step(model, step, 4)
    shares = method.report(model)["flops"]["per_step_share"]
    assert shares[:2] == [1.0, 1.0] and all(s < 1.0 for s in shares[2:])


def test_evaluation_runs_dense():
    batch = batch_for("causal-lm")
    outputs = []
    for s in (LoraSpec(), SparseLoraSpec(profile="uniform", ffn_sparsity=0.9, attention_sparsity=0.5)):
        model, method = applied("tiny-llama", "causal-lm", s)
        model.eval()
        method.prepare_batch(batch)
        with torch.no_grad():
            outputs.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_estimator_is_cached_on_disk_and_reused():
    spec = SparseLoraSpec(profile="uniform")
    _, first = applied("tiny-llama", "causal-lm", spec)
    _, second = applied("tiny-llama", "causal-lm", spec)
    assert not first.estimator["loaded"] and second.estimator["loaded"]
    assert first.estimator["file"] == second.estimator["file"]
    a = [b.up.est_out for b in first.blocks if hasattr(b, "up")]
    b = [b.up.est_out for b in second.blocks if hasattr(b, "up")]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_estimator_approximates_the_weight():
    model, method = applied("tiny-llama", "causal-lm", SparseLoraSpec(profile="uniform", estimator_rank=64))
    up = method.blocks[0].up
    x = torch.randn(10, up.in_features)
    assert torch.allclose(up.estimate(x)[:, 0], x @ up.weight.T, atol=1e-4)  # full rank: exact


def test_profiles_make_deeper_layers_sparser():
    deeper = layer_sparsity(SparseLoraSpec(profile="deeper", ffn_sparsity=0.9), 4)["ffn"]
    assert deeper == pytest.approx([0.0, 0.3, 0.6, 0.9])
    published = layer_sparsity(SparseLoraSpec(profile="published", attention_sparsity=0.5), 10)["attention"]
    assert published == [0.0] + [0.5] * 8 + [0.0]
    override = layer_sparsity(SparseLoraSpec(layers={2: {"ffn": 0.1}}), 4)["ffn"]
    assert override[2] == 0.1


def test_bad_layer_override_is_a_clear_error():
    with pytest.raises(PeftlabError, match="method.layers: layer 7 does not exist; the model has layers 0..3"):
        applied("tiny-llama", "causal-lm", SparseLoraSpec(layers={7: {"ffn": 0.5}}))


def test_merge_reaches_the_frozen_weights_under_the_sparse_wrapper():
    model, method = applied("tiny-gpt2", "causal-lm", SparseLoraSpec(profile="uniform"), placement="q,v")
    model.eval()
    batch = batch_for("causal-lm")
    with torch.no_grad():
        unmerged = model(input_ids=batch["input_ids"]).logits
        method.merge(model)
        merged = model(input_ids=batch["input_ids"]).logits
        method.unmerge(model)
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_a_run_reports_executed_flops_per_step(tmp_path):
    import json

    from conftest import run_to_dict

    from peftlab.config import validate
    from peftlab.specs import RunConfig

    rows = [{"instruction": f"Repeat the word {w} twice.", "input": "", "output": f"{w} {w}"}
            for w in ["apple", "river", "stone", "cloud"] * 6]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    config = validate(RunConfig, {
        "model": "tiny-llama", "task": {"path": str(data), "kind": "instruction"},
        "plan": {"placement": "all", "allocation": 4},
        "method": {"name": "sparselora", "profile": "uniform", "dense_fraction": 0.25},
        "train": {"max_steps": 8, "batch_size": 4, "latency_batches": 1},
    }, "test")
    result = run_to_dict(config, tmp_path / "run")
    assert result["status"] == "done"
    flops = result["method"]["flops"]
    assert flops["per_step_share"][:2] == [1.0, 1.0] and max(flops["per_step_share"][2:]) < 1.0
    assert result["method"]["dense_steps"] == 2
    assert 0 < flops["executed"] < flops["dense"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()  # a LoRA adapter, as PEFT saves it


@pytest.mark.parametrize("name, first", [("tiny-bert", True), ("tiny-llama", False)])
def test_the_token_a_classifier_reads_runs_dense(name, first):
    _, method = applied(name, "sequence-classification", SparseLoraSpec(profile="uniform"))
    batch = batch_for("sequence-classification")  # 3 rows of 16 tokens, the last row with 3 padding
    method.prepare_batch(batch)
    expected = [0, 16, 32] if first else [15, 31, 44]  # [CLS], or each row's last real token
    assert method.state.dense_rows.tolist() == expected
    everything = make_method(SparseLoraSpec(sparse_outputs=True))
    everything.head_reads_first = first
    everything.prepare_batch(batch)
    assert everything.state.dense_rows is None and len(everything.state.pool_rows) == 45


def tiny_gemma3():
    """A 2-layer Gemma 3: its attention normalizes q and k per head after projecting them."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, vocab_size=2048, max_position_embeddings=64,
                              sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def gemma3_applied(spec):
    base = tiny_gemma3()
    plan = build_plan(resolve_sites(base), count_params(base), validate(PlanSpec, {"placement": "all", "allocation": 4},
                                                                        "test"), "tiny-gemma3")
    method = make_method(spec)
    return trained_looking(method.apply(base, plan, [])), method


def test_q_and_k_normalized_per_head_stay_dense():
    model, method = gemma3_applied(SparseLoraSpec(ffn_sparsity=0, attention_sparsity=0.5, profile="uniform",
                                                  sparse_outputs=True))
    attention = unwrap(model).model.layers[0].self_attn
    sparse = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj")
              if isinstance(getattr(attention, name).base_layer, SparseProjection)]
    assert sparse == ["v_proj", "o_proj"]
    assert method.report(model)["dense_qk_layers"] == [0, 1]
    loss_and_grads(model, method, batch_for("causal-lm"), "causal-lm")
    flops = method.state.flops
    assert flops.executed / flops.dense == pytest.approx(0.5)  # v and o on half their channels
    assert method.estimator["weights"] == 2  # the estimator reads v only


def test_gemma3_with_every_channel_kept_equals_dense_lora():
    batch = batch_for("causal-lm")
    lora, lora_method = gemma3_applied(LoraSpec())
    dense_loss, dense_grads = loss_and_grads(lora, lora_method, batch, "causal-lm")
    model, method = gemma3_applied(SparseLoraSpec(ffn_sparsity=EVERY_CHANNEL, attention_sparsity=EVERY_CHANNEL,
                                                  profile="uniform", sparse_outputs=True))
    loss, grads = loss_and_grads(model, method, batch, "causal-lm")
    assert loss == pytest.approx(dense_loss, abs=1e-5)
    assert all(torch.allclose(g, dense_grads[n], atol=1e-5) for n, g in grads.items())
    assert method.state.flops.estimator > 0


def split_run(name, head, split):
    """SparseLoRA (FFN 0.5, context sparse) with the split FFN on or off, up/gate's LoRA B at zero and
    the other B random; the down projections' LoRA layers record the width of their inputs."""
    torch.manual_seed(0)
    base = load_model(ModelSpec(name=name, head=head), seed=0)
    method = make_method(SparseLoraSpec(ffn_sparsity=0.5, attention_sparsity=0, profile="uniform"))
    method.split_ffn = split
    model = method.apply(base, make_plan(name, placement="all", allocation=4), head_modules(base))
    ups = {id(p) for b in method.blocks for p in (b.up, b.gate) if p is not None}
    downs = {id(b.down) for b in method.blocks}
    widths = []
    with torch.no_grad():
        for module in unwrap(model).modules():
            if not isinstance(module, BaseTunerLayer) or not isinstance(module.base_layer, SparseProjection):
                continue
            for linear in module.lora_B.values():
                zero = id(module.base_layer) in ups
                linear.weight.copy_(torch.zeros_like(linear.weight) if zero else
                                    torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
            if id(module.base_layer) in downs:
                module.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[-1]))
    for module in model.modules():  # the two paths draw dropout masks in a different order
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    loss, grads = loss_and_grads(model, method, batch_for(head), head)
    return model, method, loss, grads, widths


@pytest.mark.parametrize("name, head", [a for a in ARCHS if a[0] != "tiny-bert"])  # BERT's FFN spans two modules
def test_split_ffn_equals_the_per_projection_path(name, head):
    """Dense and sparse tokens through the FFN as two groups, the sparse one on the kept channels only.
    With up/gate's LoRA B at zero the per-projection path's unkept intermediate channels are exactly
    zero too, so both compute the same function: equal loss and gradients, up/gate's B compared on
    their kept rows (the split path gives unkept rows no gradient)."""
    model, method, loss, grads, widths = split_run(name, head, split=True)
    _, _, ref_loss, ref_grads, ref_widths = split_run(name, head, split=False)
    assert sum(isinstance(m, SplitFfn) for m in unwrap(model).modules()) == len(method.blocks)
    full = method.blocks[0].down.in_features
    assert set(widths) == {full // 2, full} and set(ref_widths) == {full}  # narrow sparse group, full dense group
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    up_b = {n for n, m in unwrap(model).named_modules() if isinstance(m, BaseTunerLayer)
            and any(m.base_layer is p for b in method.blocks for p in (b.up, b.gate))}
    checked = 0
    for n, g in grads.items():
        owner = next((u for u in up_b if f".{u}.lora_B." in f".{n}"), None)
        if owner is None:
            assert torch.allclose(g, ref_grads[n], atol=1e-5), n
            continue
        layer = int(next(part for part in owner.split(".") if part.isdigit()))
        rows = method.blocks[layer].selected[id(method.blocks[layer].up)]
        assert torch.allclose(g[rows], ref_grads[n][rows], atol=1e-5), n
        assert torch.count_nonzero(g[rows]) > 0
        checked += 1
    assert checked == sum(2 if b.gate is not None else 1 for b in method.blocks)


def test_a_fused_gate_up_projection_is_a_clear_error():
    plan = make_plan("tiny-phi3", placement="all", allocation=4)
    model = load_model(ModelSpec(name="tiny-phi3", head="causal-lm"), seed=0)
    with pytest.raises(PeftlabError, match="fuses the FFN's gate and up projections"):
        make_method(SparseLoraSpec(), total_steps=10).apply(model, plan, [])
