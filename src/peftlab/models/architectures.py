"""Role tables per architecture family: where the layers are and which module plays which role.

One small table per family. A model is matched by `config.model_type`; layer blocks are found by
a regex over module paths, and roles by each module's path *relative to its layer block*, so
`mlp.c_proj` (ffn.down) can never be mistaken for `attn.c_proj` (attn.o).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.models.roles import Role


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_pattern: str  # regex, group 1 = layer index, matched at the end of a layer block's path
    roles: dict[str, Role | tuple[Role, ...]]  # path inside a layer -> role, or fused roles in output order


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt2",
        model_types=("gpt2",),
        layer_pattern=r"(?:^|\.)h\.(\d+)$",
        roles={
            "attn.c_attn": (Role.Q, Role.K, Role.V),  # Conv1D, output = [q | k | v]
            "attn.c_proj": Role.O,
            "mlp.c_fc": Role.UP,
            "mlp.c_proj": Role.DOWN,
        },
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
    ),
)


def family_for(model_type: str) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)
