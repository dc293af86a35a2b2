"""SparseLoRA (Khaki et al., 2025): LoRA whose frozen matmuls run on a per-batch subset of channels.

The adapters are LoRA's, on the plan. On top, each layer's FFN and attention run sparse in training:
a rank-k SVD estimator (computed once per model and cached on disk) picks the channels that matter for
the batch; the frozen projections compute only those (see `channels`). Context tokens run sparse,
supervised output tokens dense; the first steps run dense; sparsity is set per layer and block, deeper
layers sparser by default. Evaluation, merging and saving are LoRA's: the result is a LoRA adapter.
The FLOPs the frozen projections executed against their dense cost are reported per step.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers.activations import ACT2FN

from peftlab.errors import PeftlabError
from peftlab.files import save_tensors_atomic, tensor_bytes, write_atomic
from peftlab.methods.fused_slices import SliceLoRA
from peftlab.methods.lora import LoraMethod
from peftlab.methods.low_rank import LowRankLinear
from peftlab.methods.sparselora.channels import (
    AttentionBlock,
    Block,
    FfnBlock,
    Flops,
    NarrowLoraLinear,
    SparseProjection,
    SparseState,
    low_rank_factors,
    narrow_lora,
    split_ffn,
    unsplit_ffn,
)
from peftlab.methods.sparselora.profile import (
    SparsityProfile,
    allocation_increase,
    block_name,
    choose_levels,
    measure_profile,
)
from peftlab.methods.specs import SparseLoraSpec
from peftlab.models.load import cache_dir, unwrap
from peftlab.models.roles import Role
from peftlab.models.sites import Site, model_family, resolve_sites
from peftlab.plans.plan import Plan
from peftlab.tasks.kinds import kind_for_model
from peftlab.tasks.prepare import IGNORE

ESTIMATOR_VERSION = 1
PROFILE_VERSION = 2  # 2: classification profiles measure the representation the head reads


def layer_sparsity(spec: SparseLoraSpec, n_layers: int) -> dict[str, list[float]]:
    """Sparsity per layer for the FFN and the attention, from the profile and the overrides."""
    def profile(level: float) -> list[float]:
        if spec.profile == "uniform":
            return [level] * n_layers
        if spec.profile == "deeper":
            return [level * i / max(1, n_layers - 1) for i in range(n_layers)]
        first = max(1, round(n_layers / 10))
        return [level if first <= i < n_layers - 1 else 0.0 for i in range(n_layers)]

    out = {"ffn": profile(spec.ffn_sparsity), "attention": profile(spec.attention_sparsity)}
    for layer, override in spec.layers.items():
        if not 0 <= layer < n_layers:
            raise PeftlabError(f"method.layers: layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
        for block in ("ffn", "attention"):
            if getattr(override, block) is not None:
                out[block][layer] = getattr(override, block)
    return out


def _holder(base: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Where the frozen module at `path` hangs: inside PEFT's LoRA layer, a SliceLoRA, or its parent."""
    module = base.get_submodule(path)
    if isinstance(module, BaseTunerLayer):
        return module, "base_layer"
    if isinstance(module, SliceLoRA):
        return module, "base"
    parent, _, child = path.rpartition(".")
    return base.get_submodule(parent), child


def _normalizes_heads(base: nn.Module, q_path: str, norms: tuple[str, ...]) -> bool:
    """Whether the attention module holding q normalizes q or k per head after projecting (the family's
    `qk_norms`, where this model has them)."""
    attention = base.get_submodule(q_path.rpartition(".")[0])
    return any(isinstance(getattr(attention, name, None), nn.Module) for name in norms)


def _activation(model: nn.Module) -> nn.Module:
    family = model_family(model)
    name = family.activation(model.config) if family is not None else None
    if name is None:
        raise PeftlabError(f"sparselora: cannot find the FFN activation in the {model.config.model_type} config")
    return ACT2FN[name]


class SparseLoraMethod(LoraMethod):
    name = "sparselora"
    resumable = False  # its dense-then-sparse schedule and FLOP counts are per-process state
    position_wise = False  # routes each batch's positions (context sparse, outputs dense)
    shardable = False  # its calibration and routing read the weights outside the layers' forward
    split_ffn = True  # run FFNs held by one module as dense and narrow sparse groups (tests turn it off)

    @classmethod
    def summary_rows(cls, report: dict[str, Any]) -> list[tuple[str, str]]:
        rows = []
        flops = report.get("flops")
        if flops:  # what the sparsified frozen projections ran, estimator included
            rows.append(("frozen FLOPs executed (% of dense: sparsified blocks, all blocks)",
                         f"{100 * flops['executed_share']:.1f}%, {100 * flops.get('all_projections_share', 1.0):.1f}%"))
        calibration = report.get("calibration")
        if calibration:  # sparsity: auto(...)
            budget = f"sparsity auto, {calibration['loss_budget']:.1%} loss budget"
            if calibration["dense"]:
                return [*rows, (budget, "every block dense (LoRA)")]
            sparse = sum(level > 0 for level in calibration["levels"].values())
            held_out = calibration.get("held_out_increase")
            rows.append((budget, f"{sparse} of {len(calibration['levels'])} blocks sparse; loss +"
                                 f"{calibration['predicted_increase']:.2%} predicted, "
                                 f"{calibration['measured_increase']:+.2%} measured"
                                 + (f", {held_out:+.2%} held out" if held_out is not None else "")))
        return rows

    def __init__(self, spec: SparseLoraSpec, total_steps: int | None = None):
        super().__init__(spec, total_steps)
        self.state = SparseState()
        self.blocks: list[Block] = []
        self.dense_steps = round(spec.dense_fraction * total_steps) if total_steps else 0
        self.steps: list[Flops] = []
        self.sparsity: dict[str, list[float]] = {}
        self.estimator: dict[str, Any] = {}
        self.head_reads_first = True
        self.dense_qk: list[int] = []  # layers whose q and k stay dense
        self.calibration: dict[str, Any] | None = None  # sparsity: auto(...): the profile's allocation
        self.projection_flops = 0  # dense forward FLOPs per token of every attention and FFN projection

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        resolved = resolve_sites(model)  # before LoRA wraps the modules
        sites = [s for s in resolved.sites if not s.is_slice]
        family = model_family(model)
        self.head_reads_first = family is not None and family.encoder  # [CLS]; decoders read the last token
        if any(s.role is Role.GATE_UP for s in sites):
            raise PeftlabError(f"sparselora: {resolved.model_type} fuses the FFN's gate and up projections into one "
                               "module, whose channels SparseLoRA cannot select yet; use lora on this model")
        model = super().apply(model, plan, head)
        if next(model.parameters()).device.type == "meta":  # parameter counting: sparsity adds none
            return model
        base = unwrap(model)
        self.base = [base]  # a list: not a submodule of anything
        self.projection_flops = sum(2 * s.in_features * s.out_features for s in sites)  # per token, every layer
        n_layers = max(s.layer for s in sites) + 1
        auto = self.spec.sparsity
        # calibrated: every block is wrapped (the profile measures each), dense until `initialize` chooses
        self.sparsity = ({block: [max(auto.levels)] * n_layers for block in ("ffn", "attention")} if auto
                         else layer_sparsity(self.spec, n_layers))
        by_layer: dict[int, dict[Role, Site]] = {}
        for site in sites:
            by_layer.setdefault(site.layer, {})[site.role] = site
        # q and k normalized per head after the projection (Gemma 3, Qwen 3): zeroed channels would shrink
        # the head's norm and rescale the kept ones, so these layers' q and k stay dense
        norms = family.qk_norms if family is not None else ()
        self.dense_qk = sorted({s.layer for s in sites if s.role is Role.Q and _normalizes_heads(base, s.path, norms)})
        estimated = (Role.V, Role.QKV, Role.UP, Role.GATE)  # what the estimator reads
        factors = self._factors(base, [s for s in sites if self._level(s) > 0 and (
            s.role in estimated or (s.role in (Role.Q, Role.K) and s.layer not in self.dense_qk))])
        for layer, roles in sorted(by_layer.items()):
            self._wrap_ffn(base, layer, roles, factors)
            self._wrap_attention(base, layer, roles, factors)
        if auto:
            for block in self.blocks:
                block.sparsity = 0.0
        self.state.active = self.dense_steps == 0
        return model

    @property
    def reads_training_data(self) -> bool:
        return self.spec.sparsity is not None or super().reads_training_data  # batches spread over every length

    def initialize(self, model: nn.Module, batches: list[dict[str, torch.Tensor]],
                   held_out: list[dict[str, torch.Tensor]] = ()) -> None:
        """sparsity: auto(...): profile every block on training batches (cached), choose the levels within the
        loss budget, run the other blocks dense, and measure the whole allocation's loss increase on the profile
        batches (do the increases add up?) and on as many validation batches (does the prediction hold on data
        it was not fit to?)."""
        auto = self.spec.sparsity
        if auto is None or not self.blocks:
            return
        chosen = self.profile_batches(batches)
        kind = kind_for_model(model).name
        profile = self.profile(model, chosen, kind) if auto.loss_budget > 0 else None  # 0: dense, nothing to measure
        allocation = choose_levels(profile, auto.loss_budget)
        n_layers = len(self.sparsity["ffn"])
        self.sparsity = {block: [0.0] * n_layers for block in ("ffn", "attention")}
        for block in list(self.blocks):
            level = allocation.levels.get(f"{block.layer}.{block_name(block)}", 0.0)
            block.sparsity = level
            self.sparsity[block_name(block)][block.layer] = level
            if level <= 0:
                self._make_dense(block)
        if self.blocks:  # the allocation as a whole
            allocation.measured_increase = self._increase(model, chosen, kind)
            if held_out:
                allocation.held_out_increase = self._increase(model, self.profile_batches(held_out), kind)
        self.calibration = {"loss_budget": auto.loss_budget, "levels": allocation.levels, "dense": allocation.dense,
                            "reason": allocation.reason, "predicted_increase": allocation.predicted_increase,
                            "measured_increase": allocation.measured_increase,
                            "held_out_increase": allocation.held_out_increase, "predicted_saving": allocation.saving,
                            "profile_seconds": profile.seconds if profile else 0.0,
                            "profile_cached": profile.cached if profile else False}

    def _increase(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], kind: str) -> float:
        return allocation_increase(model, self.blocks, batches, kind, self.prepare_batch, self.state,
                                   self.head_reads_first)

    def profile_batches(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """`sparsity.batches` of the initial batches (sorted by length), spread evenly over the lengths."""
        count = self.spec.sparsity.batches
        if len(batches) <= count:
            return list(batches)
        step = (len(batches) - 1) / max(1, count - 1)
        return [batches[round(i * step)] for i in range(count)]

    def profile(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], kind: str) -> SparsityProfile:
        """Every block's profile on `batches`, from the disk cache when a run of this model and data made it."""
        levels = self.spec.sparsity.levels
        digest = hashlib.blake2b(digest_size=16)
        device = next(model.parameters()).device.type
        digest.update(json.dumps({"estimator": self.estimator.get("file"), "levels": levels, "kind": kind, "device": device,
                                  "sparse_outputs": self.spec.sparse_outputs, "version": PROFILE_VERSION}).encode())
        for batch in batches:
            for name in ("input_ids", "attention_mask", "labels"):
                digest.update(tensor_bytes(batch[name]))
        file = cache_dir() / "sparsity" / f"{digest.hexdigest()}.json"
        if file.is_file():
            profile = SparsityProfile.from_dict(json.loads(file.read_text()))
            profile.cached = True
            return profile
        profile = measure_profile(model, self.blocks, batches, kind, levels, self.prepare_batch, self.state,
                                  self.head_reads_first)
        write_atomic(file, json.dumps(profile.to_dict()))
        return profile

    def _make_dense(self, block: Block) -> None:
        """Put the frozen projections of a block left dense back in place: it runs as LoRA does."""
        for projection in block.projections():
            holder, attr = projection.holder[0]
            setattr(holder, attr, projection.base_layer)
        for module in self.base[0].modules():
            if getattr(module, "sparse_block", [None])[0] is block:
                if isinstance(module, NarrowLoraLinear):
                    module.__class__ = LowRankLinear
                    del module.sparse_block
                else:
                    unsplit_ffn(module)
        self.blocks.remove(block)

    def _level(self, site: Site) -> float:
        block = "attention" if site.role.value.startswith("attn") else "ffn"
        return self.sparsity[block][site.layer]

    def _project(self, base: nn.Module, site: Site, mode: str, block: Block, factors: dict) -> SparseProjection:
        holder, attr = _holder(base, site.path)
        projection = SparseProjection(getattr(holder, attr), mode, block, factors.get(site.path, []))
        projection.holder = [(holder, attr)]  # a list: the holder is not a submodule of the projection
        setattr(holder, attr, projection)
        return projection

    def _wrap_ffn(self, base: nn.Module, layer: int, roles: dict[Role, Site], factors: dict) -> None:
        level = self.sparsity["ffn"][layer]
        if level <= 0 or Role.UP not in roles or Role.DOWN not in roles:
            return
        block = FfnBlock(layer, level, self.state, _activation(base), None, None)
        block.up = self._project(base, roles[Role.UP], "out", block, factors)
        block.gate = self._project(base, roles[Role.GATE], "out", block, factors) if Role.GATE in roles else None
        block.down = self._project(base, roles[Role.DOWN], "in", block, factors)
        self.blocks.append(block)
        ffn = {roles[r].path.rpartition(".")[0] for r in (Role.UP, Role.GATE, Role.DOWN) if r in roles}
        if self.split_ffn and len(ffn) == 1 and self._narrow_loras(base, roles, block):
            split_ffn(base.get_submodule(ffn.pop()), block)  # one position-wise module holds the FFN

    @staticmethod
    def _narrow_loras(base: nn.Module, roles: dict[Role, Site], block: FfnBlock) -> bool:
        """Let the LoRA B of up/gate and A of down work on the kept channels; False where one cannot."""
        narrowed = []
        for role, name, axis in ((Role.UP, "lora_B", 0), (Role.GATE, "lora_B", 0), (Role.DOWN, "lora_A", 1)):
            module = base.get_submodule(roles[role].path) if role in roles else None
            for linear in getattr(module, name, {}).values() if isinstance(module, BaseTunerLayer) else []:
                if not narrow_lora(linear, block, axis):
                    for done in narrowed:  # undo: this FFN runs the per-projection path
                        done.__class__ = LowRankLinear
                    return False
                narrowed.append(linear)
        return True

    def _wrap_attention(self, base: nn.Module, layer: int, roles: dict[Role, Site], factors: dict) -> None:
        level = self.sparsity["attention"][layer]
        fused = Role.QKV in roles
        if level <= 0 or Role.O not in roles or not (fused or {Role.Q, Role.K, Role.V} <= roles.keys()):
            return
        config = base.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        block = AttentionBlock(layer, level, self.state, kv_heads, None)
        if fused:
            block.qkv = self._project(base, roles[Role.QKV], "out", block, factors)
        elif layer in self.dense_qk:
            block.v = self._project(base, roles[Role.V], "out", block, factors)
        else:
            block.q, block.k, block.v = (self._project(base, roles[r], "out", block, factors) for r in (Role.Q, Role.K, Role.V))
        block.o = self._project(base, roles[Role.O], "in", block, factors)
        self.blocks.append(block)

    def _factors(self, base: nn.Module, sites: list[Site]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Rank-k SVD factors of every frozen weight the estimator reads, from the disk cache when an
        earlier run of this model computed them."""
        start = time.perf_counter()
        weights = {s.path: (getattr(*_holder(base, s.path)).weight, 3 if s.role is Role.QKV else 1,
                            s.kind == "conv1d") for s in sites}
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps({"rank": self.spec.estimator_rank, "version": ESTIMATOR_VERSION}).encode())
        for path in sorted(weights):
            weight, parts, _ = weights[path]
            digest.update(f"{path}:{parts}:{weight.dtype}:{tuple(weight.shape)}".encode())
            digest.update(tensor_bytes(weight))
        file = cache_dir() / "sparselora" / f"{digest.hexdigest()}.safetensors"
        loaded = file.is_file()
        if loaded:
            stored = load_file(file)
            factors = {path: [(stored[f"{path}.{i}.P"], stored[f"{path}.{i}.Q"]) for i in range(parts)]
                       for path, (_, parts, _) in weights.items()}
        else:
            factors = {path: low_rank_factors(w, parts, self.spec.estimator_rank, conv1d)
                       for path, (w, parts, conv1d) in weights.items()}
            if factors:
                save_tensors_atomic(file, {f"{path}.{i}.{name}": t for path, pairs in factors.items()
                                           for i, pair in enumerate(pairs) for name, t in zip("PQ", pair)})
        self.estimator = {"rank": self.spec.estimator_rank, "weights": len(weights), "file": str(file),
                          "loaded": loaded, "seconds": time.perf_counter() - start}
        return factors

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Route the next micro-batch: the tokens the loss reads run dense, the rest sparse. Causal LMs:
        position t when labels[t] or labels[t + 1] (the token it predicts) is supervised. Classification:
        the token the head reads ([CLS] for encoders, the last real token for decoders)."""
        labels, mask = batch["labels"], batch["attention_mask"]
        if self.spec.sparse_outputs:
            self.state.route(mask, None)  # every token sparse
            return
        if labels.dim() == 2:
            supervised = labels != IGNORE
            dense = supervised.clone()
            dense[:, :-1] |= supervised[:, 1:]
        else:
            dense = torch.zeros_like(mask, dtype=torch.bool)
            read = torch.zeros(len(mask), dtype=torch.long) if self.head_reads_first else mask.sum(dim=1) - 1
            dense[torch.arange(len(mask)), read.to(mask.device)] = True
        self.state.route(mask, dense)

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.steps.append(self.state.flops)
        self.state.flops = Flops()
        self.state.active = step >= self.dense_steps

    def report(self, model: nn.Module) -> dict[str, Any]:
        total = Flops()
        for step in self.steps:
            total.add(step)
        share = (total.executed + total.estimator) / total.dense if total.dense else 1.0
        # every projection sees every token, so the sparsified ones' dense count gives the tokens: the saving
        # over the attention and FFN projections of every layer, those left dense included
        sparsified = sum(2 * p.in_features * p.out_features for b in self.blocks for p in b.projections())
        every = total.dense / sparsified * self.projection_flops if sparsified else 0
        saved = total.dense - total.executed - total.estimator
        return {
            "sparsity": self.sparsity,
            "calibration": self.calibration,
            "sparse_blocks": len(self.blocks),
            "dense_qk_layers": self.dense_qk,
            "dense_steps": self.dense_steps,
            "estimator": self.estimator,
            "flops": {
                "scope": "executed_share: forward matmuls of the sparsified frozen projections, estimator included; "
                         "all_projections_share: of every layer's attention and FFN projections, dense ones included",
                "dense": total.dense, "executed": total.executed, "estimator": total.estimator,
                "executed_share": share,
                "all_projections_share": 1 - saved / every if every else 1.0,
                "per_step_share": [round((s.executed + s.estimator) / s.dense, 4) if s.dense else 1.0 for s in self.steps],
            },
        }
