"""Canonical roles of adaptable linear sites, independent of any architecture's module names."""

from enum import StrEnum


class Role(StrEnum):
    Q = "attn.q"
    K = "attn.k"
    V = "attn.v"
    QKV = "attn.qkv"  # a fused q/k/v projection adapted as a whole
    O = "attn.o"
    UP = "ffn.up"
    GATE = "ffn.gate"
    GATE_UP = "ffn.gate_up"  # a fused gate/up projection adapted as a whole (Phi-3's gate_up_proj)
    DOWN = "ffn.down"

    @property
    def short(self) -> str:
        return self.value.split(".", 1)[1]


# Roles a user selects; a whole fused module's role (`attn.qkv`, `ffn.gate_up`) is never selected directly:
# it appears when every part of the fused projection is selected.
SELECTABLE = (Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.GATE, Role.DOWN)
ATTENTION = frozenset({Role.Q, Role.K, Role.V, Role.O})
FFN = frozenset({Role.UP, Role.GATE, Role.DOWN})
QKV_PARTS = (Role.Q, Role.K, Role.V)
# a fused module's whole role -> the roles of its parts (in the usual output order)
FUSED_PARTS: dict[Role, tuple[Role, ...]] = {Role.QKV: QKV_PARTS, Role.GATE_UP: (Role.GATE, Role.UP)}


def whole_role(parts: tuple[Role, ...]) -> Role:
    """The role of a fused module adapted whole, from its parts in any order."""
    for whole, members in FUSED_PARTS.items():
        if set(parts) == set(members):
            return whole
    raise ValueError(f"no role for a module fusing {', '.join(p.value for p in parts)}")

GROUPS: dict[str, frozenset[Role]] = {
    "all": ATTENTION | FFN,
    "attention": ATTENTION,
    "attn": ATTENTION,
    "ffn": FFN,
    "mlp": FFN,
    "qkv": frozenset(QKV_PARTS),
}


def parse_role(name: str) -> Role:
    """`q`, `attn.q` -> Role.Q. Raises ValueError listing the valid names."""
    key = name.strip().lower()
    for role in Role:
        if key in (role.value, role.short):
            return role
    valid = ", ".join(r.short for r in SELECTABLE)
    raise ValueError(f"unknown role {name!r}; valid roles: {valid} (or attn.*/ffn.* forms)")


def parse_roles(text: str | list[str]) -> frozenset[Role]:
    """A group name (`all`, `attention`, `ffn`) or a list of roles (`q,v`, `o,down`) -> roles.

    `qkv` stands for q, k and v together.
    """
    items = [s for s in text.split(",")] if isinstance(text, str) else list(text)
    roles: set[Role] = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item.lower() in GROUPS:
            roles |= GROUPS[item.lower()]
            continue
        role = parse_role(item)
        roles |= set(FUSED_PARTS.get(role, (role,)))
    if not roles:
        raise ValueError("no roles given; use all, attention, ffn or a list such as q,v")
    return frozenset(roles)
