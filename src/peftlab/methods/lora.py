"""LoRA from the plan: whole modules through PEFT (exact module paths, per-site ranks and alphas,
verified), slices of a fused projection through peftlab's SliceLoRA."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import EvaConfig, LoftQConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method, load_weights, set_head_trainable
from peftlab.methods.fused_slices import (
    load_slices,
    save_slices,
    slice_modules,
    wrap_slices,
)
from peftlab.methods.low_rank import use_low_rank_linears
from peftlab.models.load import head_kind, unwrap
from peftlab.plans.peft_export import lora_config_kwargs, verify_wrapped
from peftlab.plans.plan import Plan
from peftlab.tasks.fit import IGNORE


def _eva_rows(batch: dict[str, torch.Tensor]) -> int:
    """The token inputs EVA decomposes in a batch: unpadded positions, and supervised ones where labels are
    token labels (PEFT's language-modelling mask)."""
    mask = batch["attention_mask"].bool()
    if "labels" in batch:
        mask &= batch["labels"] != IGNORE
    return int(mask.sum())


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's wrapper class for the model's head (None: the generic PeftModel)."""
    return {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(head_kind(model))


class LoraMethod(Method):
    name = "lora"
    shardable = True
    adds_parameters = True
    mergeable = True

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        """Whole modules through PEFT; slices of a fused projection (q and v of GPT-2's c_attn)
        through peftlab's SliceLoRA, which PEFT cannot express."""
        self.check_plan(plan)
        whole = tuple(p for p in plan.sites if not p.site.is_slice)
        slices = [p for p in plan.sites if p.site.is_slice]
        if whole:
            sub_plan = replace(plan, sites=whole)
            kwargs = lora_config_kwargs(sub_plan, dropout=self.spec.dropout, modules_to_save=head or None)
            kwargs.update(self.peft_overrides())
            kwargs.update(self._init_kwargs())
            config = LoraConfig(task_type=peft_task_type(model), use_dora=self.spec.use_dora,
                                use_rslora=self.spec.use_rslora, **kwargs)
            with warnings.catch_warnings():  # EVA's advice to build the adapters on the meta device
                warnings.filterwarnings("ignore", "lora with eva initialization used with low_cpu_mem_usage")
                model = get_peft_model(model, config)
            verify_wrapped(model, sub_plan)
            self._whole_plan = sub_plan
            use_low_rank_linears(model)  # the same products, with a weight gradient CPUs compute fast
        else:
            model.requires_grad_(False)
            set_head_trainable(model, head)
        if slices:
            wrap_slices(unwrap(model), slices, self.spec.dropout)
        return model

    def check_device(self, device: str) -> None:
        if self.spec.init == "loftq" and device != "cuda":
            raise PeftlabError(f"method {self.name} init loftq cannot run on {device}: PEFT's LoftQ quantizes the base "
                               "weights with bitsandbytes on a CUDA device; use another init, or train.device cuda")

    def check_plan(self, plan: Plan) -> None:
        slices = any(p.site.is_slice for p in plan.sites)
        if slices and self.spec.init != "default":
            raise PeftlabError(f"method.init {self.spec.init}: not available for slices of a fused projection "
                               "(GPT-2 q/v); select q, k and v together or leave init at default")
        if slices and (self.spec.use_dora or self.spec.use_rslora):
            raise PeftlabError("method.use_dora / use_rslora: not available for slices of a fused projection "
                               "(GPT-2 q/v); select q, k and v together or drop the option")
        if self.spec.init == "olora" and any(p.site.kind == "conv1d" for p in plan.sites):
            raise PeftlabError("method.init olora: PEFT's OLoRA decomposes the weight without GPT-2's Conv1D "
                               "transposition and fails on these layers; use init pissa, eva or default")

    def _init_kwargs(self) -> dict[str, Any]:
        """LoraConfig arguments for `spec.init`."""
        init = self.spec.init
        if init == "default":
            return {}
        if init == "eva":  # rho 1: EVA keeps the plan's ranks instead of moving rank between sites
            return {"init_lora_weights": "eva", "eva_config": EvaConfig(rho=1.0)}
        if init == "loftq":
            return {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=1)}
        return {"init_lora_weights": init}

    def trainable_for(self, skeleton: nn.Module, plan: Plan, head: list[str]) -> int:
        """Counted with the default init: PiSSA, OLoRA and LoftQ decompose weights a skeleton does not have, and
        no init changes what is trained."""
        default = type(self)(self.spec.model_copy(update={"init": "default"}), self.total_steps)
        return super(LoraMethod, default).trainable_for(skeleton, plan, head)

    @property
    def reads_training_data(self) -> bool:
        return getattr(self.spec, "init", "default") == "eva"

    def initialize(self, model: nn.Module, batches: list[dict[str, torch.Tensor]],
                   held_out: list[dict[str, torch.Tensor]] = ()) -> None:
        """EVA: A from the SVD of each site's inputs over `batches` (training batches; padding and, for causal LMs,
        unsupervised positions left out)."""
        if self.spec.init != "eva":
            return
        from peft import initialize_lora_eva_weights

        def forward(peft_model, inputs):
            return peft_model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs})

        causal = peft_task_type(unwrap(model)) == "CAUSAL_LM"
        inputs = [b if causal else {k: v for k, v in b.items() if k != "labels"} for b in batches]
        # EVA decomposes each batch's token inputs at each site and skips a batch with fewer tokens than the
        # site's rank; when every batch is skipped, PEFT cycles through them for ever
        rank = max(p.rank for p in self._whole_plan.sites)
        enough = [b for b in inputs if _eva_rows(b) >= rank]
        if not enough:
            most = max((_eva_rows(b) for b in inputs), default=0)
            raise PeftlabError(f"method.init eva: decomposes each training batch's {'supervised ' if causal else ''}"
                               f"tokens and needs at least the rank ({rank}) in a batch; the first {len(inputs)} "
                               f"batch(es) hold at most {most}: use more data, a larger train.batch_size, a lower "
                               "rank, or another init")
        initialize_lora_eva_weights(model, enough, forward_fn=forward, show_progress_bar=False)
        verify_wrapped(model, self._whole_plan)  # EVA drops a site whose inputs have too few directions

    def site_params(self, site, rank: int) -> int:
        """A and B, and DoRA's magnitude per output channel."""
        return super().site_params(site, rank) + (site.out_features if self.spec.use_dora else 0)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        if isinstance(model, PeftModel):
            model = super().load(model, directory)
        elif (directory / "head.safetensors").is_file():
            load_weights(model, directory / "head.safetensors")
        load_slices(model, directory)  # named as `save` named them
        return model

    def peft_overrides(self) -> dict[str, Any]:
        """LoraConfig arguments a LoRA variant changes (QLoRA: its 4-bit layers are never Conv1D)."""
        return {}

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        groups = super().param_groups(model, lr, weight_decay)
        if not self.spec.loraplus:
            return groups
        is_b = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
        split = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in is_b]
            b = [p for p in group["params"] if id(p) in is_b]
            split += [{**group, "params": rest}] if rest else []
            split += [{**group, "params": b, "lr": lr * self.spec.loraplus_lr_ratio}] if b else []
        return split

    def merge(self, model: nn.Module) -> None:
        if isinstance(model, PeftModel):
            model.merge_adapter()
        for module in slice_modules(model).values():
            module.merge()

    def unmerge(self, model: nn.Module) -> None:
        if isinstance(model, PeftModel):
            model.unmerge_adapter()
        for module in slice_modules(model).values():
            module.unmerge()

    def save(self, model: nn.Module, directory: Path) -> None:
        """PEFT format (loads with PeftModel.from_pretrained) plus fused_slices.* for slices."""
        if isinstance(model, PeftModel):
            model.save_pretrained(directory)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            in_slices = {id(p) for module in slice_modules(model).values() for p in module.parameters()}
            head = {n: p.detach().contiguous() for n, p in model.named_parameters()
                    if p.requires_grad and id(p) not in in_slices}
            if head:
                save_file(head, str(directory / "head.safetensors"))
        save_slices(model, directory)
