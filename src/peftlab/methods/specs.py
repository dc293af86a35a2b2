"""Each method's spec: the fields a config sets under `method:`, validated without importing torch or peft.

A spec class registers itself by its `name` when defined; `MethodSpec` is the union over the registry,
so the run config validates every method without listing them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftlab.fields import added_with


class MethodSpecBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    registry: ClassVar[dict[str, type[MethodSpecBase]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("name")
        if field is not None:  # a method's spec (LayerSparsity is a part of one)
            MethodSpecBase.registry[field.default] = cls

    @property
    def label(self) -> str:
        """The method's name in messages and tables (`peft LOHA` for a PEFT type)."""
        return self.name

    def without_checkpointing(self) -> str | None:
        """Why this method cannot train with gradient checkpointing, or None when it can."""
        return None


class LoraSpec(MethodSpecBase):
    name: Literal["lora"] = "lora"
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (PEFT's lora_dropout)."""
    use_dora: bool = False
    """DoRA (Liu et al., 2024): a trained magnitude per output channel on top of the LoRA direction."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski, 2023): scale the update by alpha / sqrt(r) instead of alpha / r."""
    loraplus: bool = False
    """LoRA+ (Hayou et al., 2024): the B matrices learn `loraplus_lr_ratio` times faster than A."""
    loraplus_lr_ratio: float = Field(16.0, gt=0)
    """With `loraplus`: the B matrices' learning rate over A's (the paper's 16)."""
    init: Annotated[Literal["default", "gaussian", "pissa", "olora", "eva", "loftq"], added_with("default")] = "default"
    """How A and B start (PEFT's `init_lora_weights`). default: A Kaiming-uniform, B zero; gaussian: A Gaussian;
    pissa / olora: A and B from the base weight's principal singular vectors / its QR factors, the base keeps the
    rest; eva: A from the SVD of each site's inputs on training batches, at the plan's ranks; loftq: the base
    becomes the 4-bit NF4 quantization (simulated) of W - BA, with A and B fitted to the quantization error.
    Every one but loftq starts from the base model's outputs."""

    @model_validator(mode="after")
    def _init_for_lora(self) -> LoraSpec:
        if self.init not in ("default", "gaussian") and self.name != "lora":
            raise ValueError(f"init {self.init} is available with method lora only (default or gaussian here)")
        return self


class QLoraSpec(LoraSpec):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """The 4-bit data type of the frozen base weights: nf4 (NormalFloat, QLoRA's) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scales too (about 0.37 bits per parameter saved)."""
    blocksize: Literal[32, 64, 128, 256] = 64
    """Weights per quantization block (one scale each)."""
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the 4-bit matmuls; auto: bf16 on a GPU that supports it, fp32 otherwise."""
    merge_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """dtype of the merged copy (`merged_model`)."""
    dropout: float = Field(0.0, ge=0, lt=1)


class LayerSparsity(MethodSpecBase):
    ffn: float | None = Field(None, ge=0, lt=1)
    """Fraction of this layer's FFN channels skipped for context tokens; null: the profile's."""
    attention: float | None = Field(None, ge=0, lt=1)
    """Fraction of this layer's q/k and v/o channels skipped for context tokens; null: the profile's."""


class AutoSparsity(MethodSpecBase):
    """Sparsity per layer and block chosen from a measured profile: the largest FLOP saving whose predicted
    increase of the training loss stays within `loss_budget` (see `methods/sparsity_profile.py`)."""

    kind: Literal["auto"] = "auto"
    loss_budget: float = Field(0.01, ge=0, lt=1)
    """Allowed increase of the training loss at the start of training, relative (0.01: 1%)."""
    levels: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    """Sparsities each block is measured at (and may be given)."""
    batches: int = Field(4, ge=1, le=16)
    """Training batches the profile measures on."""

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        """`auto`, `auto(0.02)` or `auto(loss_budget=0.02, batches=2)`."""
        if not isinstance(data, str):
            return data
        text = data.strip()
        if text == "auto":
            return {}
        if not (text.startswith("auto(") and text.endswith(")")):
            raise ValueError(f"{data!r}: write auto, auto(0.01) or auto(loss_budget=0.01, batches=4)")
        out: dict[str, Any] = {}
        for i, part in enumerate(p.strip() for p in text[5:-1].split(",") if p.strip()):
            key, _, value = part.rpartition("=")
            if not key.strip() and i > 0:  # only the first value may go without its name
                raise ValueError(f"{data!r}: value {i + 1} ({value.strip()}) needs its name, e.g. "
                                 "auto(0.01, batches=4); names: loss_budget, levels, batches")
            out[key.strip() or "loss_budget"] = value.strip()
        return out

    @model_validator(mode="after")
    def _levels_in_order(self) -> AutoSparsity:
        if not self.levels or any(not 0 < v < 1 for v in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels {list(self.levels)}: increasing values between 0 and 1")
        return self


FIXED_SPARSITY = ("profile", "ffn_sparsity", "attention_sparsity", "layers")
"""SparseLoRA's fields that set sparsity by hand; `sparsity: auto(...)` chooses instead of them."""


class SparseLoraSpec(LoraSpec):
    name: Literal["sparselora"] = "sparselora"
    ffn_sparsity: float = Field(0.9, ge=0, lt=1)
    """Fraction of FFN channels skipped for context tokens, at the sparsest layers."""
    attention_sparsity: float = Field(0.5, ge=0, lt=1)
    """Fraction of q/k and v/o channels skipped for context tokens, at the sparsest layers."""
    profile: Literal["published", "deeper", "uniform"] = "published"
    """How sparsity spreads over depth. published: the first tenth of the layers (at least one) and the
    last layer dense, the rest at the set sparsity (the paper's LLaMA configurations); deeper: rises
    linearly from dense at layer 0 to the set sparsity at the last layer; uniform: every layer."""
    layers: dict[int, LayerSparsity] = {}
    """Per-layer overrides, e.g. {5: {ffn: 0.5, attention: 0}}."""
    estimator_rank: int = Field(8, ge=1)
    """Rank of the SVD of each base weight that predicts, per token, which channels matter (SparseLoRA's
    training-free estimator)."""
    dense_fraction: float = Field(0.05, ge=0, le=1)
    """Share of the optimizer steps at the start that run dense."""
    sparse_outputs: bool = False
    """Run every token sparse, the ones the loss reads (output tokens; the classifier's token) too."""
    sparsity: Annotated[AutoSparsity | None, added_with(None)] = None
    """`auto(loss_budget=0.01)`: calibrate every layer's FFN and attention sparsity on the run's own training
    batches instead of `profile`, `ffn_sparsity`, `attention_sparsity` and `layers`."""

    @model_validator(mode="after")
    def _lora_only(self) -> SparseLoraSpec:
        if self.use_dora:
            raise ValueError("use_dora is not available with sparselora (DoRA rescales the base output)")
        fixed = sorted(set(FIXED_SPARSITY) & self.model_fields_set)
        if self.sparsity is not None and fixed:
            raise ValueError(f"sparsity auto(...) chooses every level itself; drop {', '.join(fixed)}")
        return self


class AdaLoraSpec(MethodSpecBase):
    name: Literal["adalora"] = "adalora"
    init_ratio: float = Field(1.5, ge=1.0)
    """Initial rank = init_ratio x the plan's mean rank (the paper's 1.5)."""
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    """Steps before pruning starts (tinit), as a fraction of the run."""
    final_fraction: float = Field(0.3, ge=0, lt=1)
    """Steps with the final ranks fixed (tfinal), as a fraction of the run."""
    orth_reg_weight: float = Field(0.5, ge=0)
    """Weight of the orthogonality penalty on AdaLoRA's P and Q (PEFT's orth_reg_weight)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""

    def without_checkpointing(self) -> str | None:
        return "PEFT's AdaLoRA rank allocator fails on a model with checkpointed layers"


class HiraSpec(MethodSpecBase):
    name: Literal["hira"] = "hira"
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""


class BottleneckSpec(MethodSpecBase):
    name: Literal["bottleneck"] = "bottleneck"
    variant: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: after attention and after the FFN; pfeiffer: after the FFN only."""
    activation: Literal["relu", "gelu", "silu"] = "relu"
    """The nonlinearity between the down and up projections."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the bottleneck's output, before the up projection."""


class PrefixSpec(MethodSpecBase):
    name: Literal["prefix"] = "prefix"
    variant: Literal["prefix", "prompt"] = "prefix"
    """prefix: keys and values at every layer; prompt: input embeddings before the text."""
    num_virtual_tokens: int = Field(16, ge=1, le=4096)
    """Length of the learned prefix (or prompt), in tokens: its size parameter, matched by `budget`."""
    projection: bool = False
    """Prefix only: train the prefix through a two-layer MLP (Li & Liang's reparametrisation); more
    parameters while training, the same prefix at inference."""
    projection_hidden: int = Field(512, ge=1)
    """With `projection`: the MLP's hidden width."""

    def without_checkpointing(self) -> str | None:
        if self.variant == "prefix":
            return ("its learned keys and values are a key/value cache, which transformers drops under checkpointing; "
                    "variant prompt can use it")
        return None


class BitFitSpec(MethodSpecBase):
    name: Literal["bitfit"] = "bitfit"
    scope: Literal["all", "plan"] = Field("all")
    """all: every bias of the model (as published); plan: biases of the planned sites only."""


PEFT_TYPES = {"LOHA": "LoHaConfig", "LOKR": "LoKrConfig", "IA3": "IA3Config", "VERA": "VeraConfig",
              "OFT": "OFTConfig", "BOFT": "BOFTConfig", "FOURIERFT": "FourierFTConfig"}
"""PEFT methods that run on peftlab's plans, each with PEFT's config class (`methods/peft_types.py` holds how each
one is set up)."""
PLAN_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                         "alpha_pattern", "n_frequency_pattern", "modules_to_save", "feedforward_modules",
                         "fan_in_fan_out", "task_type", "r", "alpha", "inference_mode", "peft_type"})
"""PEFT config fields the plan sets: placement as exact module paths, ranks and alphas per site, the head."""


class PeftTypeSpec(MethodSpecBase):
    """Any method of PEFT's `PEFT_TYPES` on the plan's sites, e.g. {name: peft, type: LOHA}."""

    name: Literal["peft"] = "peft"
    type: Literal[tuple(PEFT_TYPES)]  # type: ignore[valid-type]
    """The PEFT method: LOHA, LOKR, IA3, VERA, OFT, BOFT or FOURIERFT (case-insensitive)."""
    options: dict[str, Any] = {}
    """Further fields of the type's PEFT config (e.g. LOKR's decompose_factor, OFT's oft_block_size)."""

    @property
    def label(self) -> str:
        return f"peft {self.type}"

    @model_validator(mode="before")
    @classmethod
    def _upper_case_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            data = {**data, "type": data["type"].upper()}
        return data

    @model_validator(mode="after")
    def _plan_fields_from_the_plan(self) -> PeftTypeSpec:
        taken = sorted(PLAN_FIELDS & self.options.keys())
        if taken:
            raise ValueError(f"options {taken} come from the plan (placement, allocation, head); set them there")
        try:
            check_options(self.type, self.options)
        except ValueError as exc:
            raise ValueError(f"options.{exc}") from None
        return self


OPTION_MINIMUM = {"oft_block_size": 1, "boft_block_size": 1, "boft_block_num": 0, "boft_n_butterfly_factor": 1,
                  "n_frequency": 1, "projection_prng_key": 0, "random_loc_seed": 0, "num_cayley_neumann_terms": 1,
                  "r": 0}  # the least value PEFT can work with, where PEFT itself divides by it or indexes with it


def check_options(type_name: str, options: dict[str, Any]) -> None:
    """Each option is a field of the type's PEFT config, of that field's type (strictly: 1.5 is not an int),
    finite, a probability where it is a dropout, and at least OPTION_MINIMUM's value: ValueError naming it."""
    import dataclasses
    import typing

    import peft
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    config = getattr(peft, PEFT_TYPES[type_name])
    hints = typing.get_type_hints(config)
    known = {f.name for f in dataclasses.fields(config)}
    for name, value in options.items():
        if name not in known:
            close = ", ".join(sorted(known - PLAN_FIELDS - {"auto_mapping", "base_model_name_or_path", "revision",
                                                            "peft_version"}))
            raise ValueError(f"{name}: not a field of PEFT's {config.__name__}; its fields: {close}")
        try:
            TypeAdapter(hints[name], config=ConfigDict(strict=True, allow_inf_nan=False)).validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"{name}: {value!r} is not a valid {_type_name(hints[name])} "
                             f"({exc.errors()[0]['msg'].lower()})") from None
        if name.endswith("dropout") and not 0 <= value < 1:
            raise ValueError(f"{name}: {value!r} is not a probability in [0, 1)")
        if name in OPTION_MINIMUM and isinstance(value, int) and value < OPTION_MINIMUM[name]:
            raise ValueError(f"{name}: {value!r}; it must be at least {OPTION_MINIMUM[name]}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class FullSpec(MethodSpecBase):
    name: Literal["full"] = "full"


SPECS = MethodSpecBase.registry
MethodSpec = Annotated[Union[tuple(SPECS.values())], Field(discriminator="name")]  # noqa: UP007
