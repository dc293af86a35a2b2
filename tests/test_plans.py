import json

import pytest
from conftest import make_plan

from peftlab.errors import PeftlabError
from peftlab.models.roles import Role


def lora_params(rank, fan_in, fan_out):
    return rank * (fan_in + fan_out)


def test_gpt2_attention_adapts_c_attn_and_attn_c_proj_but_no_mlp_c_proj():
    plan = make_plan("tiny-gpt2", placement="attention", allocation=8)
    paths = [p.site.path for p in plan.sites]
    assert paths == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
    ]
    assert not any("mlp" in p for p in paths)
    assert plan.trainable_params == 2 * (lora_params(8, 64, 192) + lora_params(8, 64, 64)) == 6144


def test_bert_attention_has_no_pooler_and_no_ffn_output_dense():
    plan = make_plan("tiny-bert", placement="attention", allocation=8)
    paths = {p.site.path for p in plan.sites}
    assert not any("pooler" in p for p in paths)
    assert "bert.encoder.layer.0.output.dense" not in paths
    assert "bert.encoder.layer.0.attention.output.dense" in paths
    assert plan.trainable_params == 2 * 4 * lora_params(8, 64, 64)


def test_distilbert_ffn_counts():
    plan = make_plan("tiny-distilbert", placement="ffn", allocation=4)
    assert {p.site.role for p in plan.sites} == {Role.UP, Role.DOWN}
    assert plan.trainable_params == 2 * (lora_params(4, 64, 128) + lora_params(4, 128, 64))


def test_llama_all_counts_and_share():
    plan = make_plan("tiny-llama", placement="all", allocation=4)
    per_layer = sum(lora_params(4, i, o) for i, o in
                    [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert plan.trainable_params == 4 * per_layer
    assert plan.share == pytest.approx(plan.trainable_params / plan.base_params)
    assert plan.totals()["sites"] == 28


def test_gpt2_q_and_v_are_slices_of_the_fused_projection():
    plan = make_plan("tiny-gpt2", placement="q,v", allocation=8)
    assert [(p.site.role, p.site.out_slice) for p in plan.sites if p.site.layer == 0] == [
        (Role.Q, (0, 64)), (Role.V, (128, 192))
    ]
    assert plan.trainable_params == 2 * 2 * lora_params(8, 64, 64)


@pytest.mark.parametrize(
    "selector, layers",
    [
        ("all", [0, 1, 2, 3]), ("lower-half", [0, 1]), ("upper-half", [2, 3]), ("every-2nd", [0, 2]),
        ("every-2nd+1", [1, 3]), ("first-1", [0]), ("last-3", [1, 2, 3]), ("0,3", [0, 3]), ("1-2", [1, 2]),
        ([2], [2]), ("lower-third", [0]), ("middle-third", [1, 2]), ("upper-third", [3]),
    ],
)
def test_layer_selectors(selector, layers):
    plan = make_plan("tiny-llama", placement={"roles": "o", "layers": selector}, allocation=2)
    assert [p.site.layer for p in plan.sites] == layers


def test_linear_allocation_decays_with_depth_over_adapted_layers():
    plan = make_plan("tiny-llama", placement="o", allocation="linear(16->4)")
    assert [p.rank for p in plan.sites] == [16, 12, 8, 4]
    plan = make_plan("tiny-llama", placement={"roles": "o", "layers": "upper-half"}, allocation="linear(2->10)")
    assert [p.rank for p in plan.sites] == [2, 10]


def test_attention_heavy_weights_roles():
    plan = make_plan("tiny-llama", placement="all", allocation="attention-heavy(4)")
    ranks = {p.site.role: p.rank for p in plan.sites if p.site.layer == 0}
    assert ranks == {Role.Q: 8, Role.K: 8, Role.V: 8, Role.O: 8, Role.GATE: 4, Role.UP: 4, Role.DOWN: 4}
    custom = make_plan("tiny-llama", placement="all",
                       allocation={"kind": "role-weighted", "rank": 4, "weights": {"ffn": 0.5, "down": 2}})
    ranks = {p.site.role: p.rank for p in custom.sites if p.site.layer == 0}
    assert ranks[Role.UP] == 2 and ranks[Role.DOWN] == 8 and ranks[Role.Q] == 4


def _closest_uniform(costs, target, cap):
    return min(range(1, cap + 1), key=lambda r: abs(r * costs - target))


@pytest.mark.parametrize("target", [5000, 20000, 33333])
def test_budget_uniform_is_the_closest_uniform_rank(target):
    plan = make_plan("tiny-llama", placement="all", allocation=f"budget({target})")
    ranks = {p.rank for p in plan.sites}
    assert len(ranks) == 1
    cost = sum(p.site.in_features + p.site.out_features for p in plan.sites)
    assert ranks.pop() == _closest_uniform(cost, target, 32)


def test_budget_keeps_the_shape_and_lands_near_the_target():
    plan = make_plan("tiny-llama", placement="all", allocation="budget(40000, linear(16->4))")
    by_layer = [next(p.rank for p in plan.sites if p.site.layer == i) for i in range(4)]
    assert by_layer == sorted(by_layer, reverse=True) and by_layer[0] > by_layer[-1]
    assert abs(plan.trainable_params - 40000) / 40000 < 0.05


def test_budget_out_of_reach_is_an_error():
    with pytest.raises(PeftlabError, match="below the smallest plan"):
        make_plan("tiny-llama", placement="all", allocation="budget(10)")


def test_from_scores_json_and_csv(tmp_path):
    rows = [{"layer": layer, "role": "attn.o", "score": score} for layer, score in enumerate([1, 1, 2, 4])]
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"sites": rows}))
    plan = make_plan("tiny-llama", placement="o", allocation={"kind": "from-scores", "path": str(scores), "rank": 8, "max": 12})
    assert [p.rank for p in plan.sites] == [4, 4, 8, 12]  # mean score 2 -> rank 8; 16 clamped to 12
    csv_file = tmp_path / "scores.csv"
    csv_file.write_text("layer,role,score\n" + "".join(f"{r['layer']},o,{r['score']}\n" for r in rows))
    assert [p.rank for p in make_plan("tiny-llama", placement="o", allocation=f"from-scores({csv_file})").sites] == [4, 4, 8, 16]


def test_from_scores_missing_site_names_the_file(tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps([{"layer": 0, "role": "o", "score": 1}]))
    with pytest.raises(PeftlabError, match=r"scores.json: no score for layer 1 attn.o"):
        make_plan("tiny-llama", placement="o", allocation=f"from-scores({scores})")


def test_alpha_policies():
    assert {p.alpha for p in make_plan("tiny-bert", allocation=4).sites} == {8.0}  # default alpha = 2r
    assert {p.alpha for p in make_plan("tiny-bert", allocation=4, alpha="16").sites} == {16.0}
    assert {p.alpha for p in make_plan("tiny-bert", allocation=4, alpha="ratio(1)").sites} == {4.0}


def test_ambiguous_module_name_warns():
    plan = make_plan("tiny-gpt2", placement={"modules": ["c_attn", "c_proj"]}, allocation=8)
    assert any("'c_proj' is ambiguous" in w and "attn.o and ffn.down" in w for w in plan.warnings)
    assert "transformer.h.0.mlp.c_proj" in {p.site.path for p in plan.sites}  # what the user asked for
    clean = make_plan("tiny-gpt2", placement={"modules": ["c_attn"]}, allocation=8)
    assert clean.warnings == ()


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"allocation": 100}, "rank 100 at .* must be between 1 and min\\(in, out\\) = 64"),
        ({"placement": {"roles": "o", "layers": "7"}}, "layer index 7 is out of range; the model has 4 layers"),
        ({"placement": {"roles": "o", "layers": "last-9"}}, "1 <= K <= 4"),
        ({"placement": "attention", "allocation": "linear(8->0)"}, "greater than or equal to 1"),
    ],
)
def test_invalid_plans_are_errors(plan, message):
    with pytest.raises(PeftlabError, match=message):
        make_plan("tiny-llama", **plan)


def test_selection_matching_nothing_is_an_error():
    with pytest.raises(PeftlabError, match="placement matches no site"):
        make_plan("tiny-bert", placement="gate")


def test_plan_json_shape():
    data = json.loads(make_plan("tiny-bert", placement="attention", allocation=8).to_json())
    assert set(data["totals"]) >= {"trainable_params", "base_params", "sites"}
    assert data["totals"]["trainable_params"] == sum(s["params"] for s in data["sites"])
    assert set(data["sites"][0]) >= {"layer", "role", "path", "in_features", "out_features", "rank", "alpha", "params"}


def test_phi3_placements_take_fused_modules_whole_or_as_slices():
    def layer0(placement):
        return [(p.site.role, p.site.out_slice) for p in make_plan("tiny-phi3", placement=placement, allocation=4).sites
                if p.site.layer == 0]

    assert layer0("all") == [(Role.QKV, None), (Role.O, None), (Role.GATE_UP, None), (Role.DOWN, None)]
    assert layer0("ffn") == [(Role.GATE_UP, None), (Role.DOWN, None)]
    assert layer0("q,v") == [(Role.Q, (0, 64)), (Role.V, (96, 128))]
    assert layer0("up") == [(Role.UP, (96, 192))]
    # the parameters follow each slice's own width: v is half as wide as q
    plan = make_plan("tiny-phi3", placement="q,v", allocation=4)
    assert plan.trainable_params == 2 * (lora_params(4, 64, 64) + lora_params(4, 64, 32))
    weighted = make_plan("tiny-phi3", placement="all", allocation="role-weighted(4, attn=2, ffn=1)")
    assert {p.site.role: p.rank for p in weighted.sites if p.site.layer == 0} == {
        Role.QKV: 8, Role.O: 8, Role.GATE_UP: 4, Role.DOWN: 4}


def test_per_part_ranks_count_as_the_lora_paper_counts(tmp_path):
    """gpt2-medium, q, k, v at r=4: one update per part 3 x 4 x 2 x 1024 x 24 = 589,824, against 393,216 for one
    update on c_attn. GPT-3 175B's layout: every weight-type setting of the LoRA paper's 18M budget (Table 5) is
    18,874,368 parameters only with one update per part; its 4.7M and 37.7M rows are q, v at r=1 and r=8."""
    import json

    medium = {"roles": "q,k,v"}
    assert make_plan("gpt2-medium", placement={**medium, "fused": "parts"}, allocation=4).trainable_params == 589_824
    assert make_plan("gpt2-medium", placement=medium, allocation=4).trainable_params == 393_216
    gpt3 = tmp_path / "gpt3-175b.json"
    gpt3.write_text(json.dumps({"model_type": "gpt2", "n_layer": 96, "n_embd": 12288, "n_head": 96,
                                "n_positions": 2048, "vocab_size": 50257}))
    table5 = {"q": 8, "k": 8, "v": 8, "o": 8, "q,k": 4, "q,v": 4, "q,k,v,o": 2}
    counts = {roles: make_plan(str(gpt3), placement={"roles": roles, "fused": "parts"}, allocation=r).trainable_params
              for roles, r in table5.items()}
    assert set(counts.values()) == {18_874_368}
    assert make_plan(str(gpt3), placement={"roles": "q,k,v,o"}, allocation=2).trainable_params == 14_155_776  # whole
    assert make_plan(str(gpt3), placement={"roles": "q,v", "fused": "parts"}, allocation=1).trainable_params == 4_718_592
    assert make_plan(str(gpt3), placement={"roles": "q,v", "fused": "parts"}, allocation=8).trainable_params == 37_748_736
