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
    DOWN = "ffn.down"

    @property
    def short(self) -> str:
        return self.value.split(".", 1)[1]


# Roles a user selects; `attn.qkv` is never selected directly: it appears when q, k and v of a
# fused projection are all selected.
SELECTABLE = (Role.Q, Role.K, Role.V, Role.O, Role.UP, Role.GATE, Role.DOWN)
ATTENTION = frozenset({Role.Q, Role.K, Role.V, Role.O})
FFN = frozenset({Role.UP, Role.GATE, Role.DOWN})
QKV_PARTS = (Role.Q, Role.K, Role.V)

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
        roles |= set(QKV_PARTS) if role is Role.QKV else {role}
    if not roles:
        raise ValueError("no roles given; use all, attention, ffn or a list such as q,v")
    return frozenset(roles)
