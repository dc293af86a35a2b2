"""Validated, frozen specs: what a plan, a run and a study are made of. Reading them from YAML is `config`."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from peftlab.fields import UNLEARNED, added_with
from peftlab.methods.specs import LoraSpec, MethodSpec
from peftlab.models.roles import Role, parse_role, parse_roles
from peftlab.plans.allocation import AllocationSpec, UniformAllocation, parse_allocation
from peftlab.plans.placement import validate_layer_selector
from peftlab.tasks.glue import glue_task
from peftlab.tasks.kinds import KINDS, Instruction, task_kind

MAX_SEED = 2**32 - 1  # what numpy's and torch's generators take
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
MAX_SEEDS = 1000  # seeds per configuration of a study, at most


MAX_LR = 1e30  # optimizers multiply by the rate in float32 (at most 3.4e38); far above any rate that trains

class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


class ModelSpec(Spec):
    name: str = "minilm-l6"
    """A preset (minilm-l6, gemma-3-270m, tiny-*), a catalog architecture, a local directory or a Hugging Face id."""
    head: Literal["auto", "causal-lm", "sequence-classification", "base"] = "auto"
    """Which head to build: auto = sequence classification for encoders, causal LM for decoders."""
    num_labels: int = Field(2, ge=2)
    """Outputs of the classification head where no task sets them (`peftlab plan`); a run takes them from its task
    (its classes, at least 2; one output for regression)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the weights as loaded (16-bit halves the base's memory); PEFT keeps adapters in fp32."""
    revision: str | None = None
    """A Hub commit, tag or branch of the model: pins its weights (the commit a run loaded is recorded either way)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless the user turns it on."""
    role_map: dict[str, Role] | None = None
    """For architectures peftlab does not know: regex over full module paths -> role."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Set every dropout probability of the model (hidden, attention, classifier) to this value; default:
    the model's own. 0 lets the prefix cache skip the frozen lower layers without changing the result."""
    attn_implementation: Annotated[Literal["auto", "sdpa", "eager", "flash_attention_2"], added_with("auto")] = "auto"
    """The attention kernel (transformers' `attn_implementation`). auto: on a CPU under bf16 autocast, eager for
    training, where torch's fused attention kernel can run its backward pass several times slower than in fp32 (at
    MiniLM's 32-wide heads: 18 ms against 4 ms per call; eager makes MiniLM's training step 1.5x as fast and Gemma 3
    270M's no slower: `benchmarks/attention.py`), and sdpa for evaluation, generation and timing (forward only);
    elsewhere transformers' default (sdpa where the model has it).
    flash_attention_2 needs a CUDA GPU and the flash-attn package. The kernels a run used are in its result
    (`environment.attn_implementation`, and `attn_implementation_forward` for its forward-only phases)."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("role_map", mode="before")
    @classmethod
    def _check_role_map(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of regex -> role")
        checked = {}
        for pattern, role in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
            checked[pattern] = parse_role(str(role))
        return checked


class PlacementSpec(Spec):
    roles: str | list[str] | None = None
    """`all`, `attention`, `ffn`, or roles such as `q,v` or [o, down]. Default: all (or what `modules` names)."""
    layers: str | list[int] = "all"
    """`all`, `lower-half`, `upper-half`, `lower-third`, `middle-third`, `upper-third`, `every-2nd`,
    `first-4`, `last-4`, or explicit indices (`0,2,5`, `0-3`, [0, 2, 5])."""
    modules: list[str] | None = None
    """PEFT-style module names matched as path suffixes (warned when a name spans several roles)."""
    fused: Annotated[Literal["whole", "parts"], added_with("whole")] = "whole"
    """A fused projection whose every part is selected (GPT-2's `c_attn` with q, k and v, Phi-3's `qkv_proj`,
    `gate_up_proj`): whole = one update on the whole module (PEFT's way, the default); parts = one update per
    part, each with its own rank, as the LoRA paper's implementation (loralib's MergedLinear) adapts it and as its
    GPT-3 tables count (q, k, v at r=4 on gpt2-medium: 589,824 parameters, against 393,216 whole). Parts of a
    fused projection train with LoRA and SparseLoRA only. Where some parts are selected, only those are
    adapted, either way."""

    @model_validator(mode="before")
    @classmethod
    def _from_roles(cls, value: Any) -> Any:
        return {"roles": value} if isinstance(value, (str, list)) else value

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, value: Any) -> Any:
        if value is not None:
            parse_roles(value)
        return value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: Any) -> Any:
        validate_layer_selector(value)
        return value

    @field_validator("modules")
    @classmethod
    def _check_modules(cls, value: Any) -> Any:
        if value is not None and not [m for m in value if m.strip()]:
            raise ValueError("empty list; give module names such as [c_attn] or leave it out")
        return value


class AlphaSpec(Spec):
    policy: Literal["ratio", "fixed"] = "ratio"
    """ratio: alpha = value x r (constant alpha/r; 2 gives alpha = 2r). fixed: alpha = value everywhere."""
    value: float = Field(2.0, gt=0)
    """The ratio (policy ratio) or alpha itself (policy fixed)."""

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"policy": "fixed", "value": value}
        if not isinstance(value, str):
            return value
        text = value.strip().replace(" ", "")
        if m := re.fullmatch(r"(?:ratio\()?([0-9.]+)r\)?|ratio\(([0-9.]+)\)", text):
            return {"policy": "ratio", "value": float(m.group(1) or m.group(2))}
        if m := re.fullmatch(r"(?:fixed\()?([0-9.]+)\)?", text):
            return {"policy": "fixed", "value": float(m.group(1))}
        raise ValueError(f"invalid alpha {value!r}; use 2r / ratio(2) (alpha = 2r) or 16 / fixed(16)")

    def alpha_for(self, rank: int) -> float:
        return self.value * rank if self.policy == "ratio" else self.value


class PlanSpec(Spec):
    placement: PlacementSpec = PlacementSpec()
    """Where adapters go: roles and layers (see PlacementSpec); `attention` is short for {roles: attention}."""
    allocation: AllocationSpec = UniformAllocation()
    """The rank at each adapted site: `8` or `uniform(8)`, `linear(16->4)`, `attention-heavy(8)`, `budget(100000,
    uniform)`, `from-scores(file)`, `importance(gradient)`, or one of the mappings below."""
    alpha: AlphaSpec = AlphaSpec()
    """LoRA's scale alpha at each site: `2r` (the default: alpha/r = 2 at every rank) or a fixed number such as
    `16`."""
    bias: Annotated[Literal["none", "adapted", "all"], added_with("none")] = "none"
    """Bias terms trained with the adapters: none; adapted = those of the adapted modules (PEFT's `lora_only`);
    all = every bias of the model but the task head's, LayerNorms' included (PEFT's `all`). Counted in the plan, saved beside the adapter
    (`extras.safetensors`), on top of a `budget`."""
    norms: Annotated[bool, added_with(False)] = False
    """Also train every LayerNorm / RMSNorm weight (and bias) of the model: the LoRA paper's Adapter^L baseline,
    Houlsby adapters' trainable norms. Counted and saved as `bias` is."""

    @field_validator("allocation", mode="before")
    @classmethod
    def _parse_allocation(cls, value: Any) -> Any:
        return parse_allocation(value) if isinstance(value, (str, int)) else value


class PlanConfig(Spec):
    """What `peftlab plan --config` reads: a model and a plan."""

    model: ModelSpec = ModelSpec()
    """The model whose sites are planned (see ModelSpec); built on the meta device, no weights loaded."""
    plan: PlanSpec = PlanSpec()
    """Placement, ranks and alpha (see PlanSpec)."""


class DatasetSpec(Spec):
    """A dataset read with `datasets.load_dataset`: a Hub id, a local dataset directory or a data file. Written as
    `ID` or `ID:CONFIG` (`glue:sst2`), or as this mapping."""

    path: str = Field(min_length=1)
    """A Hub dataset id, a local dataset directory or a data file, as `datasets.load_dataset` takes it."""
    name: str | None = None
    """The dataset's configuration (GLUE's `sst2`, `mrpc`, ...)."""
    revision: str | None = None
    """A Hub commit, tag or branch: pins the data (recorded as the run's input either way)."""
    columns: dict[str, str] = {}
    """The task's column -> the dataset's, e.g. {instruction: query, output: response} for MetaMathQA, or
    {text: sentence1, text_pair: sentence2} with `task.text_pair_column: text_pair`."""

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            path, colon, name = value.rpartition(":")
            return {"path": path, "name": name} if colon and path and name and "/" not in name else {"path": value}
        return value

    @model_serializer(mode="wrap")
    def _as_text(self, handler):  # a plain id dumps as the string it was (run ids from before the mapping stay)
        dumped = handler(self)
        if self.revision is None and not self.columns:
            return self.path if self.name is None else f"{self.path}:{self.name}"
        return dumped

    @property
    def label(self) -> str:
        return self.path + (f":{self.name}" if self.name else "") + (f"@{self.revision}" if self.revision else "")


class TaskSpec(Spec):
    name: Literal["reviews", "reviews-instruct"] | None = None
    """A bundled task. Without `path` or `dataset`, the default is `reviews`."""
    kind: Literal[tuple(KINDS)] | None = None  # type: ignore[valid-type]
    """Required with `path` or `dataset`: a task kind of `tasks.kinds.KINDS`."""
    path: Path | None = None
    """CSV, JSON (a list of objects) or JSONL with the training rows."""
    test_path: Path | None = None
    """Test rows; without it a `test_fraction` of the training rows is held out."""
    dataset: DatasetSpec | None = None
    """A `datasets` id or local path (`ID` or `ID:CONFIG`), read with `datasets.load_dataset` (see DatasetSpec).
    A GLUE task (`glue:mrpc`, `nyu-mll/glue:stsb`) brings its kind, columns and scored split (`tasks.glue`)."""
    train_split: str = "train"
    """The dataset's split the training (and validation) rows come from (`dataset` only)."""
    test_split: str | None = None
    """The dataset's split scored as the test split (`dataset` only; GLUE: its validation split, whose labels are
    public); default: a `test_fraction` of the training rows."""
    text_column: str = "text"
    """The column holding the text (classification and regression)."""
    text_pair_column: Annotated[str | None, added_with(None)] = None
    """Sentence pairs (MRPC, RTE, QNLI, QQP, STS-B): the second text's column, encoded as the tokenizer encodes a
    pair ([CLS] a [SEP] b [SEP] for BERT)."""
    label_column: str = "label"
    """The column holding the label: a class name or number (classification), a number (regression)."""
    labels: list[str] | None = None
    """Class names in order; default: the sorted labels found in training."""
    format: Literal[("auto", *Instruction.FORMATS, "chat")] = "auto"  # type: ignore[valid-type]
    """Instruction rows: alpaca = instruction/input/output, dolly = instruction/context/response, chat =
    `messages` ([{role, content}]) or ShareGPT `conversations` ([{from, value}]) formatted with the chat
    template, loss on the assistant turns only. auto: chat when rows have messages or conversations, dolly
    when they have response, else alpaca."""
    chat_template: str | None = Field(None, min_length=1, pattern=r"\S")
    """Chat rows: a Jinja chat template to use instead of the tokenizer's own (needed where it has none)."""
    template: str | None = None
    """Prompt template with {instruction}, {input}, {input_block}, {with_input}; default: Alpaca's."""
    max_length: int = Field(128, ge=8, le=1_048_576)
    """Tokens per example; at most the model's position limit (checked before the data is read)."""
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the training rows (after the test rows are taken) held out for validation: what early evaluations,
    learning-rate tuning and degenerate checks read. 0: no validation split."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the training rows held out as the test split when the task has no test rows of its own
    (`test_path`, `test_split`)."""
    split_seed: Seed = 0
    """Seed of the train/validation/test split; fixed across training seeds so runs pair up."""
    max_train_examples: int | None = Field(None, ge=1)
    """Train on at most this many rows (the first of the split's seeded order); default: all."""
    max_eval_examples: int | None = Field(None, ge=1)
    """Score at most this many validation and test rows (the first of each split); default: all."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and not any(value.get(k) is not None for k in ("name", "path", "dataset")):
            return {**value, "name": "reviews"}
        if isinstance(value, dict) and (glue := glue_task(value)) is not None:  # its kind, columns and splits
            return {**glue.defaults(), **{k: v for k, v in value.items() if v is not None}}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        sources = [s for s in (self.name, self.path, self.dataset) if s is not None]
        if len(sources) > 1:
            raise ValueError("give one of name, path or dataset")
        if self.name is None and self.kind is None:
            raise ValueError(f"kind is required with path or dataset: {' or '.join(KINDS)}")
        return self

    @property
    def resolved_kind(self) -> str:
        from peftlab.tasks.bundled import BUNDLED

        return BUNDLED[self.name][0] if self.name else self.kind


class TrainSpec(Spec):
    seed: Seed = 0
    """Seed of the initialization, dropout and batch order; a study sets it to each of its seeds."""
    epochs: float = Field(1.0, gt=0, le=100_000)
    """Passes over the training rows (fractions allowed); `max_steps` overrides it."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides epochs. A run of fewer steps than an epoch trains on the first
    max_steps x batch_size x grad_accum training examples (of the split's seeded order): only they are tokenized,
    unless the method starts from the whole training split (LoRA's EVA init, SparseLoRA's calibrated sparsity)."""
    batch_size: int = Field(16, ge=1)
    """Examples per forward pass."""
    batching: Literal["bucketed", "random", "packed"] = "bucketed"
    """bucketed: examples of similar length train together (less padding; a fresh random mix every epoch).
    random: uniformly random batches, as most trainers draw them. packed (instruction tasks on a causal LM): the
    batches of `random`, each concatenated into one row without padding, positions restarting at every example
    and attention confined to it (transformers' packed-sequence masks): the same losses and gradients as
    `random`, without computing padding; one process, LoRA-family and other methods that leave the sequence as
    it is (not prefix tuning, not SparseLoRA)."""
    eval_batch_size: int = Field(64, ge=1)
    """Examples per forward pass in evaluation (no gradients kept, so it can be larger)."""
    grad_accum: int = Field(1, ge=1)
    """Forward passes whose gradients add up to one optimizer step (effective batch = batch_size x grad_accum)."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate, reached after warmup. A study's `tune` chooses it per configuration on validation."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay on the trainable weights."""
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"] = "adamw"
    """adamw: torch's; the others are bitsandbytes' 8-bit and paged AdamW (QLoRA's memory savers)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup: linear decay to 0, cosine decay to 0, or constant."""
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    """Share of the optimizer steps over which the rate rises linearly from 0 to `lr`."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradients' global norm to this value before each step; null: no clipping."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the validation split every N optimizer steps (0: only at the end)."""
    eval_at: Annotated[list[float] | None, UNLEARNED] = None
    """Also evaluate on the validation split at these fractions of the steps, e.g. [0.5, 0.75]; the result
    keeps each as `metrics.validation@0.5` beside the final `metrics.validation`, which shows whether a run was
    still improving when it stopped. Default: none for a run, [0.75] for a study's seed runs."""
    log_every: int = Field(10, ge=1)
    """Record the training loss every N optimizer steps (metrics.jsonl, trackers, training curves)."""
    device: Annotated[Literal["auto", "cuda", "mps", "cpu"], added_with("auto")] = "auto"
    """auto: CUDA, then Apple's MPS, then the CPU."""
    precision: Literal["auto", "native", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it (else fp16), fp16 on MPS, fp32 on a CPU. native: as auto, and bf16 on a
    CPU that has bf16 instructions (AVX512-BF16 or AMX), where it runs 1.5-2x faster; fp32 on other CPUs.
    bf16 autocasts on any CPU (slow without those instructions); fp16 needs a GPU."""
    prefix_cache: bool = True
    """When every adapter is at or above layer L > 0: compute the frozen layers below L once per example
    (deterministically, dropout off there) and reuse their output across epochs and study runs."""
    last_layer_at_head: bool = True
    """Classification with a BERT-family or DistilBERT encoder: after attention, the last layer runs at [CLS]
    only, the one position the head reads (same logits and gradients, fewer FLOPs)."""
    checkpoint_every: Annotated[int, UNLEARNED] = Field(0, ge=0)
    """Save the training state (trainable weights, optimizer, scheduler, random generators) every N optimizer
    steps in the run's `.partial` directory; the same command (or a study's recovery) after a kill resumes
    from it and ends with the uninterrupted run's metrics. 0: never."""
    stop_at: Annotated[float | None, UNLEARNED] = Field(None, gt=0, lt=1)
    """Stop at this fraction of the run's optimizer steps (rounded, at least one; a rung of successive halving):
    the run saves its training state in its `.partial` directory, scores the validation split and ends with
    status `stopped`, writing no result directory. The same config without it (or with a later stop) resumes
    from there, on the full run's learning-rate schedule, to the uninterrupted run's weights and metrics."""
    gradient_checkpointing: Annotated[bool, UNLEARNED] = False
    """Recompute each layer's activations in the backward pass instead of keeping them (non-reentrant): less
    memory for long sequences and large models, more time per step; the same gradients."""
    sharding: Annotated[Literal["none", "fsdp"], UNLEARNED] = "none"
    """none: over several processes, every process holds the whole model (data parallel). fsdp: each layer block's
    weights, gradients and optimizer state are split over the processes (torch's FSDP2) and gathered layer by
    layer for each pass, so a process holds about 1/N of the layers; embeddings, final norm and head stay whole
    on every process. The same weights as data parallel (gradients summed, not averaged). LoRA and full
    fine-tuning; one process runs unsharded. Generation, benchmarks, latency and saving gather the layers on
    every process: the weights must fit one device, their gradients and optimizer state need not."""
    compile: bool = False
    """torch.compile each layer block (one graph shared by all layers, dynamic sequence lengths). Costs a
    compilation up front (~45 s for MiniLM on 2 CPU cores); pays off on long runs and GPUs."""
    latency_batches: int = Field(5, ge=0)
    """Batches timed for inference latency, merged and unmerged (0: skip)."""
    evaluate_test: bool = True
    """Evaluate on the test split at the end. A study's tuning runs turn it off: they are judged on the
    validation split alone, so the test split plays no part in choosing the learning rate."""

    @field_validator("eval_at")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0 < f < 1 for f in value):
            raise ValueError("each fraction of the steps lies strictly between 0 and 1, e.g. [0.5, 0.75]")
        return None if value is None else sorted(set(value))

    @field_validator("lr")
    @classmethod
    def _rate_an_optimizer_takes(cls, value: float) -> float:
        if value > MAX_LR:
            raise ValueError(f"{value:g} is above {MAX_LR:g}, the largest rate an optimizer takes in float32")
        return value

    @property
    def examples_drawn(self) -> int | None:
        """The most training examples a run of max_steps can draw (None: it counts in epochs)."""
        return self.max_steps * self.batch_size * self.grad_accum if self.max_steps else None


class GenerateSpec(Spec):
    """Generation-based evaluation of an instruction task: the adapted model (and, once, the base model)
    completes test prompts; ROUGE-L and exact match score the completions against the references."""

    examples: int = Field(200, ge=1)
    """Test examples completed: the first N of the (seeded, shuffled) test split, the same for every run."""
    max_new_tokens: int = Field(128, ge=1, le=4096)
    """Tokens generated per completion at most (a completion ends earlier at the end-of-sequence token)."""
    batch_size: int = Field(16, ge=1)
    """Prompts completed at once (left-padded)."""
    greedy: bool = True
    """Greedy decoding (deterministic); off: sampled with temperature and top_p from `seed`."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with `greedy: false`)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling's probability mass (with `greedy: false`)."""
    seed: Seed = 0
    """Seed of sampled decoding (with `greedy: false`), the same for every run so completions pair up."""
    base: bool = True
    """Also complete the prompts with the base model (cached, so a study pays for it once) and score it."""


class ForgettingSpec(Spec):
    """Forgetting: the loss on a general text before and after adaptation (PEFT's method comparison reports
    it too). The text is cut into chunks of task.max_length tokens; every token is predicted."""

    path: Path
    """A .txt file, or CSV / JSON / JSONL rows whose `text` column is read."""
    text_column: str = "text"
    """The column read from CSV / JSON / JSONL rows."""
    max_tokens: int = Field(32768, ge=16)
    """Tokens read from the text at most (its start)."""

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, Path)) else value


class BenchmarksSpec(Spec):
    """Standard benchmarks through lm-evaluation-harness (the `bench` extra) on the adapted model, merged where the
    method merges, and once on the base model (cached): e.g. {tasks: [arc_easy, gsm8k], num_fewshot: 5}."""

    tasks: list[str] = Field(min_length=1)
    """lm-evaluation-harness task (or group) names, those of the YAML files in `include`, or peftlab's own
    offline ones (`peftlab_reviews_sentiment`: positive or negative, on the bundled reviews' test split)."""
    num_fewshot: int | None = Field(None, ge=0)
    """Examples shown before each question; default: each task's own."""
    limit: int | None = Field(None, ge=1)
    """Examples scored per task (the first ones); default: all. Scores on a limit are not the published ones'."""
    batch_size: int = Field(8, ge=1)
    """Requests scored at once. lm-eval scores the longest first, and a batch's logits take batch x longest
    request x vocabulary floats (8 x 150 tokens x Gemma's 262,144: 1.3 GB, twice while normalised)."""
    chat_template: bool = False
    """Render each prompt with the tokenizer's chat template (instruction-tuned models)."""
    include: Path | None = None
    """A folder of task YAML files of your own (lm-evaluation-harness' format), read besides its own tasks."""
    base: bool = True
    """Also score the base model (cached: a study pays for it once per model and settings)."""

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        return {"tasks": value} if isinstance(value, (list, str)) and value else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EvalSpec(Spec):
    generate: GenerateSpec | None = None
    """Score generated completions of the test prompts (instruction tasks), e.g. {examples: 200,
    max_new_tokens: 128}; `true` takes the defaults."""
    forgetting: ForgettingSpec | None = None
    """A general text (FILE) whose loss before and after adaptation measures forgetting (causal LMs)."""
    benchmarks: Annotated[BenchmarksSpec | None, added_with(None)] = None
    """lm-evaluation-harness tasks scored at the end of the run (causal LMs); see BenchmarksSpec."""

    @field_validator("generate", mode="before")
    @classmethod
    def _generate_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


class TrackingSpec(Spec):
    """Experiment trackers (through accelerate): the resolved config as parameters, the training curve, the final
    metrics and costs. Offline by default (see `train.tracking`). `tracking: [tensorboard, mlflow]` is short for
    {backends: [tensorboard, mlflow]}."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(min_length=1)
    """Trackers to log to: tensorboard, mlflow and/or wandb (each needs its package: the extras of the same names)."""
    project: str = Field("peftlab", min_length=1, pattern=r"\S")
    """MLflow's experiment, W&B's project."""
    run_name: str | None = None
    """Default: the run directory's name. In a study, `<run_name or study>/<configuration>/seed <seed>`."""
    tags: dict[str, str] = {}
    """In a study, `study`, `configuration`, `seed` and `phase` are added."""
    mlflow_uri: str | None = None
    """Default: $MLFLOW_TRACKING_URI, else a file store in ./mlruns."""

    @model_validator(mode="before")
    @classmethod
    def _from_backends(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"backends": [value]}
        return {"backends": value} if isinstance(value, list) else value

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"backends repeat: {value}")
        return value


class RunConfig(Spec):
    """What `peftlab run` reads: model, task, plan, method and training settings."""

    model: ModelSpec = ModelSpec()
    """The base model and how it is loaded (see ModelSpec); a string is its name."""
    task: TaskSpec = TaskSpec(name="reviews")
    """The data and how it is read and split (see TaskSpec); a string is a bundled task's name."""
    plan: PlanSpec = PlanSpec()
    """Where adapters go and with which rank and alpha (see PlanSpec)."""
    method: MethodSpec = LoraSpec()
    """The fine-tuning method and its options, chosen by `name` (lora, qlora, sparselora, adalora, hira,
    bottleneck, prefix, bitfit, peft, full); a string is its name (`peft:loha` for a PEFT type)."""
    train: TrainSpec = TrainSpec()
    """Optimization, batching, evaluation schedule, device and precision (see TrainSpec)."""
    eval: EvalSpec = EvalSpec()
    """Evaluation beyond loss and accuracy: generation scores and forgetting (instruction tasks)."""
    tracking: Annotated[TrackingSpec | None, UNLEARNED] = None
    """Experiment trackers, e.g. [tensorboard, mlflow] (see TrackingSpec)."""
    budget: int | None = Field(None, ge=1)
    """Trainable parameters (head excluded) to match: the method's size parameter (uniform rank over the
    placement, bottleneck width, prefix length) is chosen to come closest, for equal-budget comparisons."""

    @model_validator(mode="after")
    def _extras_fit_the_method(self) -> RunConfig:
        if (self.plan.bias != "none" or self.plan.norms) and self.method.name in ("full", "bitfit"):
            what = "trains every parameter" if self.method.name == "full" else "chooses its biases itself (method.scope)"
            raise ValueError(f"plan.bias / plan.norms: method {self.method.name} {what}; leave them off")
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> RunConfig:
        if self.train.batching != "packed":
            return self
        if self.task.resolved_kind != "instruction":
            raise ValueError(f"train.batching: packed applies to instruction tasks (a causal LM); this task is "
                             f"{self.task.resolved_kind}: use bucketed or random")
        if self.method.name in ("prefix", "sparselora"):
            raise ValueError(f"train.batching: packed: method {self.method.name} reads each example as a padded row "
                             "of its own; use bucketed or random")
        return self

    @model_validator(mode="after")
    def _evaluation_fits_the_task(self) -> RunConfig:
        if (self.eval.generate or self.eval.forgetting or self.eval.benchmarks) and \
                not task_kind(self.task.resolved_kind).generates:
            raise ValueError("eval.generate, eval.forgetting and eval.benchmarks apply to instruction tasks (a causal LM); "
                             f"this task is {self.task.resolved_kind}")
        if self.train.gradient_checkpointing and (reason := self.method.without_checkpointing()):
            raise ValueError(f"train.gradient_checkpointing: method {self.method.label} cannot use it: {reason}; "
                             "leave it off")
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _method_from_name(cls, value: Any) -> Any:
        """`lora`, or `peft:loha` for a PEFT type."""
        if not isinstance(value, str):
            return value
        name, _, peft_type = value.partition(":")
        return {"name": name, "type": peft_type} if peft_type else {"name": name}


def config_id(config: Spec | dict[str, Any]) -> str:
    """A short stable hash of a resolved config: equal configs get equal ids."""
    import hashlib
    import json

    data = config.model_dump(mode="json", by_alias=True) if isinstance(config, BaseModel) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Axis shortcuts in a study spec; any dotted path into a run config works too.
AXIS_PATHS = {
    "placement": "plan.placement",
    "layers": "plan.placement.layers",
    "allocation": "plan.allocation",
    "rank": "plan.allocation.rank",  # the base rank of the allocation in `base` (uniform by default)
    "alpha": "plan.alpha",
    "method": "method",
    "model": "model",
    "task": "task",
    "lr": "train.lr",
    "budget": "budget",
    "variant": "",  # each value is a mapping of dotted paths -> values, set together
}


UNTUNABLE = ("task", "model.name", "method.name", "plan.placement", "budget", "tracking", "eval", "train.lr",
             "train.seed", "train.stop_at", "train.eval_at", "train.evaluate_test", "train.latency_batches", "train.device",
             "train.distributed")  # settings `tune.grid` may not choose (or under them)


def within(path: str, other: str) -> bool:
    """Whether dotted `path` is `other` or lies inside it."""
    return path == other or path.startswith(other + ".")


Scalar = str | float | int | bool


class Range(Spec):
    """A range of a sampled setting: low to high, on a log scale with `log`."""

    low: float
    """The range's lower end (drawn values are at least this)."""
    high: float
    """The range's upper end (drawn values are below this)."""
    log: bool = False
    """Draw uniformly on a log scale (rates, weight decay), else linearly."""

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"a range needs low < high (and low > 0 on a log scale); got {self.low:g} to {self.high:g}")
        return self


class SampleSpec(Spec):
    """Points drawn up front from a space by one of Optuna's seeded samplers, instead of a grid: the same spec gives
    the same points (with the same Optuna version; each tuning run's config records its own)."""

    points: int = Field(8, ge=2, le=200)
    """How many points to draw."""
    seed: int = Field(0, ge=0)
    """The sampler's seed: the same seed draws the same points."""
    sampler: Literal["sobol", "random"] = "sobol"
    """sobol: a scrambled Sobol sequence (Optuna's QMCSampler), which covers the space evenly with few points;
    random: independent draws (RandomSampler). Choices (lists) are drawn at random by both."""
    space: dict[str, Range | list[Scalar]]
    """Setting -> a range {low, high, log} or a list of choices; `lr` is required (the learning rate), e.g.
    {lr: {low: 1.0e-4, high: 3.0e-3, log: true}, model.dropout: [0, 0.1]}. Sampled numbers are rounded to 3
    significant digits, so that runs are named readably (points that round alike are drawn once)."""

    @model_validator(mode="after")
    def _needs_a_rate(self) -> SampleSpec:
        lr = self.space.get("lr")
        if lr is None:
            raise ValueError("sample.space needs lr, e.g. lr: {low: 1.0e-4, high: 3.0e-3, log: true}")
        values = [lr.low, lr.high] if isinstance(lr, Range) else lr
        if not values or any(isinstance(v, (str, bool)) or not (math.isfinite(v) and 0 < v <= MAX_LR) for v in values):
            raise ValueError(f"sample.space.lr: positive rates up to {MAX_LR:g}; got {values}")
        if importlib.util.find_spec("optuna") is None:
            raise ValueError("tune.sample draws its points with Optuna: pip install 'peftlab[tune]' (or optuna)")
        return self


class TuneSpec(Spec):
    """The learning rate chosen per configuration on the validation split, before its seed runs: every rate
    of the grid trains with each tuning seed, and the rate with the best mean validation metric (accuracy for
    classification, loss for instruction tuning) trains the study's seeds. The test split is never read.
    With `grid` or `sample`, other training settings are chosen with the rate (each combination is a point)."""

    lr: list[float] | None = None
    """Rates to try, e.g. [3.0e-4, 1.0e-3, 3.0e-3]."""
    lr_factors: list[float] | None = None
    """Or factors of each configuration's own train.lr, e.g. [0.3, 1, 3] (a range around each method's rate)."""
    seeds: list[Seed] = Field(default_factory=lambda: [1000], min_length=1, max_length=MAX_SEEDS)
    """Tuning seeds, kept apart from the study's seeds so that no tuning run is reused as a result."""
    rungs: list[float] = []
    """Successive halving: fractions of the training steps (ascending, e.g. [0.33]) at which a configuration's
    rates are compared on validation once all have reached it; a rate degenerate there stops, and of the rest
    the best `keep` share (at least one) continues, resuming from its checkpoint, so the rate chosen at the end
    trained exactly as it would have uninterrupted. []: every rate trains to the end. Methods that cannot
    resume from a checkpoint (AdaLoRA, SparseLoRA) train to the end."""
    keep: float = Field(1 / 3, gt=0, lt=1)
    """Share of the rates that continues at each rung (rounded up): 1/3 keeps one of three."""
    grid: dict[str, list[Scalar]] = {}
    """Other settings tuned with the rate: dotted path -> values, e.g. {model.dropout: [0, 0.1], train.warmup_ratio:
    [0, 0.06]}; every combination is tried with every rate (a point), the best point on validation trains the seed
    runs. Only settings that leave the comparison's meaning alone: not a study axis (nor inside or above one), not
    the task, the model, the method's name or the placement, nor what a run evaluates."""
    sample: SampleSpec | None = None
    """Instead of lr (or lr_factors) and grid: points drawn from a space (see SampleSpec)."""

    @field_validator("rungs")
    @classmethod
    def _rungs_within_a_run(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value) or value != sorted(set(value)):
            raise ValueError(f"rungs: ascending fractions of the training steps, each between 0 and 1; got {value}")
        return value

    @model_validator(mode="after")
    def _one_grid(self) -> TuneSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("the tuning seeds must not repeat")
        if self.sample is not None:
            if self.lr is not None or self.lr_factors is not None or self.grid:
                raise ValueError("tune.sample draws the rate and the other settings: leave out lr, lr_factors and grid")
        else:
            grid = self.lr if self.lr is not None else self.lr_factors
            if (self.lr is None) == (self.lr_factors is None):
                raise ValueError("give the rates as lr: [3.0e-4, 1.0e-3] or as lr_factors: [0.3, 1, 3], not both")
            if not grid or any(not (math.isfinite(x) and x > 0) for x in grid):
                raise ValueError(f"the grid needs positive finite values, got {grid}")
            if self.lr is not None and max(self.lr) > MAX_LR:
                raise ValueError(f"lr: {max(self.lr):g} is above {MAX_LR:g}, the largest rate an optimizer takes in float32")
            if len(set(grid)) != len(grid):
                raise ValueError("the grid must not repeat")
        settings = self.grid if self.sample is None else {k: v for k, v in self.sample.space.items() if k != "lr"}
        for path, values in settings.items():
            where = "grid" if self.sample is None else "sample.space"
            if isinstance(values, list):
                _check_values(f"{where}: {path}", values)
            if any(within(path, fixed) for fixed in UNTUNABLE):
                raise ValueError(f"{where}: {path} changes what is compared or measured; tune only training settings "
                                 "such as model.dropout, train.warmup_ratio, train.schedule, plan.alpha.value")
        return self

    @property
    def paths(self) -> list[str]:
        """The settings tuned with the rate, in a point's order (after the rate)."""
        return sorted(self.grid if self.sample is None else (p for p in self.sample.space if p != "lr"))

    @property
    def names(self) -> tuple[str, ...]:
        """The coordinates of a point: lr, then `paths`."""
        return ("lr", *self.paths)

    @property
    def beyond_the_rate(self) -> bool:
        """Whether points carry more than the rate (a grid or a sampled space)."""
        return bool(self.paths) or self.sample is not None

    def points(self, own: float) -> list[tuple[Any, ...]]:
        """Every point a configuration whose train.lr is `own` tries: (rate, *values of `paths`)."""
        if self.sample is not None:
            return sampled_points(self.sample)
        return list(itertools.product(self.rates(own), *(self.grid[path] for path in self.paths)))

    def settings(self, point: tuple[Any, ...]) -> dict[str, Any]:
        """Dotted path -> value of a point."""
        return {"train.lr": point[0], **dict(zip(self.paths, point[1:]))}

    def describe(self, point: tuple[Any, ...]) -> str:
        """A point as the report names it: the rate alone (0.001), or each setting (lr 0.001, model.dropout 0.1)."""
        if not self.beyond_the_rate:
            return f"{point[0]:g}"
        return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                         for name, value in zip(self.names, point))

    def rates(self, own: float) -> list[float]:
        """The rates tried by a configuration whose train.lr is `own` (the grid's, or those drawn)."""
        if self.sample is not None:
            return sorted({point[0] for point in sampled_points(self.sample)})
        return sorted(self.lr) if self.lr is not None else sorted(own * f for f in self.lr_factors)


def _check_values(where: str, values: list[Any]) -> None:
    if not values or len(set(map(repr, values))) != len(values):
        raise ValueError(f"{where}: give distinct values, e.g. [0, 0.1]; got {values}")
    kinds = {"name" if isinstance(v, str) else "flag" if isinstance(v, bool) else "number" for v in values}
    if len(kinds) > 1:
        raise ValueError(f"{where}: values of one kind (numbers, true/false or names); got {values}")


def sampled_points(sample: SampleSpec) -> list[tuple[Any, ...]]:
    """The points `sample` draws, (lr, *the other settings by path), in the order drawn."""
    return list(_sampled(sample.model_dump_json()))


@functools.lru_cache(maxsize=32)
def _sampled(key: str) -> tuple[tuple[Any, ...], ...]:
    import warnings

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    sample = SampleSpec.model_validate_json(key)
    names = ["lr", *sorted(p for p in sample.space if p != "lr")]
    space = {name: FloatDistribution(value.low, value.high, log=value.log) if isinstance(value, Range)
             else CategoricalDistribution(value) for name, value in sample.space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # QMCSampler is marked experimental, and draws choices independently
        warnings.simplefilter("ignore")
        sampler = (optuna.samplers.QMCSampler(seed=sample.seed, scramble=True) if sample.sampler == "sobol"
                   else optuna.samplers.RandomSampler(seed=sample.seed))
        study = optuna.create_study(sampler=sampler)
        drawn = [study.ask(space).params for _ in range(sample.points)]
    points = (tuple(_rounded(params[name]) for name in names) for params in drawn)
    return tuple(dict.fromkeys(points))


def _rounded(value: Any) -> Any:
    return float(f"{value:.3g}") if isinstance(value, float) else value


class SeedRounds(Spec):
    """Seeds until resolved: after the study's seeds, configurations whose comparison with the baseline is
    still unresolved get `step` more seeds per round, up to `max` (see `studies.adaptive`)."""

    max: int = Field(12, ge=2, le=MAX_SEEDS)
    """Seeds per configuration at most."""
    step: int = Field(1, ge=1)
    """Seeds added per round to each unresolved configuration."""
    futility: float = Field(0.1, ge=0, lt=1)
    """No more seeds for a comparison whose chance of resolving by `max` (its predictive probability, from the seeds
    so far) is below this: it stays unresolved, and says so (see `analysis.futility`). 0: seeds up to `max`."""


class Reference(Spec):
    """A published result for one configuration, shown beside the study's own in the report (the verdicts and the
    frontier do not read it)."""

    value: float
    """In the metric's units as peftlab reports it (accuracy 0.945, not 94.5)."""
    spread: float | None = Field(None, gt=0)
    """The ± the source prints; the published interval is value ± spread."""
    interval: tuple[float, float] | None = None
    """The published interval itself, where the source gives one (instead of a spread)."""
    n: int | None = Field(None, ge=1)
    """Runs (seeds) behind the published value."""
    source: str = Field(min_length=1)
    """Where it is published, e.g. "LoRA (Hu et al., 2021), Table 2"."""
    metric: str | None = None
    """The metric it reports: a name (mcc) or a dotted column (metrics.benchmarks.gsm8k.exact_match); default: the
    study's quality metric."""

    @model_validator(mode="after")
    def _one_interval(self) -> Reference:
        if self.spread is not None and self.interval is not None:
            raise ValueError("give a spread or an interval, not both")
        if self.interval is not None and not self.interval[0] <= self.value <= self.interval[1]:
            raise ValueError(f"interval {list(self.interval)} does not hold value {self.value}")
        return self

    @property
    def bounds(self) -> tuple[float, float] | None:
        if self.interval is not None:
            return self.interval
        return (self.value - self.spread, self.value + self.spread) if self.spread is not None else None


class StudySpec(Spec):
    """A study: a base run config, axes whose values are combined, and seeds for each combination."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The study's name: letters, digits, `_`, `.` and `-`; its default directory is studies/<name>."""
    description: str = ""
    """A sentence the report opens with: what the study asks."""
    base: dict[str, Any] = {}
    """A run config (model, task, plan, method, train) shared by every run."""
    axes: dict[str, dict[str, Any] | list[Any]] = {}
    """axis (a shortcut such as placement, or a dotted path such as train.lr) -> values,
    as a list or as a mapping name -> value (names label the configurations)."""
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)
    """Training seeds every configuration runs with (runs pair up by seed); or {min: 3, max: 12} for seeds until
    resolved."""
    metric: str | None = None
    """The quality metric the verdicts, seeds until resolved and the report judge: a name (mcc) or a dotted column
    (metrics.benchmarks.arc_easy.acc); default: the task's (its GLUE metric, else its kind's primary)."""
    margin: float | None = Field(None, gt=0)
    """Equivalence margin in the units of the quality metric (e.g. 0.01 accuracy, 0.02 loss): a difference
    from the baseline whose confidence interval lies within ±margin is a verdict of `equivalent`.
    Default: 0.01 for accuracy and macro-F1, 0.02 for loss, 2% of the baseline's mean otherwise."""
    tune: TuneSpec | None = None
    """Choose each configuration's learning rate on validation first (see TuneSpec)."""
    until_resolved: SeedRounds | None = None
    """Add seeds where comparisons are unresolved; `seeds: {min: 3, max: 12}` is short for seeds [0, 1, 2]
    with until_resolved {max: 12}."""
    references: dict[str, Reference] = {}
    """Configuration label -> a published result to show beside it, e.g. {"method=lora": {value: 0.948, spread:
    0.003, n: 5, source: "LoRA paper, Table 2"}}."""

    @model_validator(mode="before")
    @classmethod
    def _seed_range(cls, value: Any) -> Any:
        seeds = value.get("seeds") if isinstance(value, dict) else None
        if not isinstance(seeds, dict):
            return value
        unknown = set(seeds) - {"min", "max", "step", "futility"}
        if unknown or not isinstance(seeds.get("min"), int) or not 2 <= seeds["min"] <= MAX_SEEDS:
            raise ValueError(f"seeds: a list of seeds, or {{min: 3, max: 12, step: 1, futility: 0.1}} with 2 <= min <= "
                             f"{MAX_SEEDS}")
        rounds = {k: seeds[k] for k in ("max", "step", "futility") if k in seeds}
        return {**value, "seeds": list(range(seeds["min"])), "until_resolved": rounds}

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, value: dict[str, Any]) -> dict[str, Any]:
        for axis, values in value.items():
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
            paths = [AXIS_PATHS.get(axis, axis)]
            if axis == "variant":
                variants = values.values() if isinstance(values, dict) else values
                if not all(isinstance(v, dict) for v in variants):
                    raise ValueError("each variant is a mapping of dotted paths to values, e.g. {method: full, train.lr: 5.0e-5}")
                paths = [AXIS_PATHS.get(k, k) for v in variants for k in v]
            for path in paths:
                if path.split(".")[0] not in RunConfig.model_fields:
                    valid = ", ".join(AXIS_PATHS)
                    raise ValueError(f"unknown axis {path!r}; use {valid} or a dotted path such as train.lr")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return value

    @model_validator(mode="after")
    def _rounds_above_the_first_seeds(self) -> StudySpec:
        if self.until_resolved is not None and self.until_resolved.max <= len(self.seeds):
            raise ValueError(f"until_resolved.max ({self.until_resolved.max}) must exceed the {len(self.seeds)} "
                             "first seeds")
        if self.until_resolved is not None and len(self.seeds) < 2:
            raise ValueError("seeds until resolved start from at least 2 seeds (a paired test needs two)")
        return self

    @model_validator(mode="after")
    def _tuning_owns_the_rate(self) -> StudySpec:
        if self.tune is not None and self.tune.lr is not None and any(
                AXIS_PATHS.get(axis, axis) == "train.lr" for axis in self.axes):
            raise ValueError("tune.lr chooses the learning rate: remove the lr axis, or tune with lr_factors")
        # (a rank axis may set the whole allocation: `rank: [uniform(4), linear(8)]`)
        axes = ["plan.allocation" if a == "rank" else AXIS_PATHS.get(a, a) for a in self.axes if a != "variant"] + [
            AXIS_PATHS.get(k, k) for a, values in self.axes.items() if a == "variant"
            for v in (values.values() if isinstance(values, dict) else values) for k in v]
        for path in (self.tune.paths if self.tune is not None else []):
            if clash := next((a for a in axes if within(path, a) or within(a, path)), None):
                raise ValueError(f"tune: {path} is what the study compares (its axis {clash}); tune other settings")
        train = self.base.get("train")
        if (isinstance(train, dict) and train.get("stop_at")) or "train.stop_at" in self.axes:
            raise ValueError("train.stop_at: a study stops its runs itself (tune.rungs); leave it out of the study")
        return self
