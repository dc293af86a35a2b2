"""One record per architecture family: every fact peftlab needs about it, in one place.

A model is matched by `config.model_type`; layer blocks are found by a regex over module paths, and roles
by each module's path *relative to its layer block*, so `mlp.c_proj` (ffn.down) can never be mistaken for
`attn.c_proj` (attn.o). The record also says whether the family is an encoder (and so where a sequence
classifier's head reads), which modules a sequence classifier adds, where the last layer can be cut to
the head's position, and which per-head q/k norms follow the projections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftlab.models.roles import Role


@dataclass(frozen=True)
class Fused:
    """A module whose output concatenates several roles' outputs, in this order. `widths` gives each part's
    width from the model's config (grouped-query attention makes k and v narrower than q); without it, the
    parts are equally wide."""

    parts: tuple[Role, ...]
    widths: Callable[[Any], tuple[int, ...]] | None = None


def grouped_qkv_widths(config: Any) -> tuple[int, int, int]:
    """q, k, v widths of a fused projection under grouped-query attention."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_pattern: str  # regex, group 1 = layer index, matched at the end of a layer block's path
    roles: dict[str, Role | Fused]  # path inside a layer -> its role, or the parts of a fused module
    encoder: bool = False
    """Bidirectional encoder: sequence classification by default, and its head reads position 0 ([CLS]).
    Otherwise a decoder: causal LM by default, a sequence classifier's head reads the last token."""
    head_modules: tuple[str, ...] = ("score",)
    """Modules a sequence-classification model of the family adds on top of the pretrained body."""
    sliced_from: str | None = None
    """Encoders: the module of a layer block from whose input on only [CLS] matters (train.last_layer_at_head)."""
    qk_norms: tuple[str, ...] = ()
    """Attributes of the attention module that normalize q or k per head after the projection, where a
    model of the family has them (Gemma 3, Qwen 3)."""
    activation_fields: tuple[str, ...] = ("hidden_act",)
    """Config fields that name the FFN's activation function, the first one present counting."""

    def activation(self, config: Any) -> str | None:
        """The name of the FFN's activation function in `config` (transformers' ACT2FN key), if it names one."""
        return next((name for field in self.activation_fields if isinstance(name := getattr(config, field, None), str)),
                    None)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt2",
        model_types=("gpt2",),
        layer_pattern=r"(?:^|\.)h\.(\d+)$",
        roles={
            "attn.c_attn": Fused((Role.Q, Role.K, Role.V)),  # Conv1D, output = [q | k | v]
            "attn.c_proj": Role.O,
            "mlp.c_fc": Role.UP,
            "mlp.c_proj": Role.DOWN,
        },
        activation_fields=("activation_function",),
    ),
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie"),
        layer_pattern=r"(?:^|\.)encoder\.layer\.(\d+)$",
        roles={
            "attention.self.query": Role.Q,
            "attention.self.key": Role.K,
            "attention.self.value": Role.V,
            "attention.output.dense": Role.O,
            "intermediate.dense": Role.UP,
            "output.dense": Role.DOWN,
        },
        encoder=True,
        head_modules=("classifier",),
        sliced_from="attention.output",  # output projection, residual, layer norm, then the FFN
    ),
    Family(
        name="distilbert",
        model_types=("distilbert",),
        layer_pattern=r"(?:^|\.)transformer\.layer\.(\d+)$",
        roles={
            "attention.q_lin": Role.Q,
            "attention.k_lin": Role.K,
            "attention.v_lin": Role.V,
            "attention.out_lin": Role.O,
            "ffn.lin1": Role.UP,
            "ffn.lin2": Role.DOWN,
        },
        encoder=True,
        head_modules=("pre_classifier", "classifier"),
        sliced_from="sa_layer_norm",  # the layer norm after attention, then the FFN
        activation_fields=("activation",),
    ),
    Family(
        name="llama",
        model_types=(
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
            "olmo", "olmo2", "granite", "smollm3",
        ),
        layer_pattern=r"(?:^|\.)layers\.(\d+)$",
        roles={
            "self_attn.q_proj": Role.Q,
            "self_attn.k_proj": Role.K,
            "self_attn.v_proj": Role.V,
            "self_attn.o_proj": Role.O,
            "mlp.gate_proj": Role.GATE,
            "mlp.up_proj": Role.UP,
            "mlp.down_proj": Role.DOWN,
        },
        qk_norms=("q_norm", "k_norm"),
        activation_fields=("hidden_activation", "hidden_act"),  # Gemma names it hidden_activation
    ),
    Family(
        name="phi3",
        model_types=("phi3",),
        layer_pattern=r"(?:^|\.)layers\.(\d+)$",
        roles={
            "self_attn.qkv_proj": Fused((Role.Q, Role.K, Role.V), grouped_qkv_widths),  # [q | k | v], k and v narrower
            "self_attn.o_proj": Role.O,
            "mlp.gate_up_proj": Fused((Role.GATE, Role.UP)),  # [gate | up]
            "mlp.down_proj": Role.DOWN,
        },
    ),
)


def family_for(model_type: str) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)
