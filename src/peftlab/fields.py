"""Spec fields: how a spec class is walked by field name (aliases and discriminated unions included), and the
marks a field carries for a run's identity.

A run's id hashes its config (`studies.grid`). Two marks keep ids stable where the config changes but what the
run learns does not:

- `UNLEARNED`: the field never changes what a run learns (trackers, training checkpoints, recomputed
  activations); it is left out of every id.
- `added_with(default)`: the field was added after studies existed; while it holds the default it was added
  with (the behaviour every earlier run had), it is left out, so those studies keep their ids.

A field is marked where it is declared: `checkpoint_every: Annotated[int, UNLEARNED] = 0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class IdentityMark:
    learned: bool = True
    added_with: tuple[Any, ...] = ()  # (the default the field was added with,) or () for an original field


UNLEARNED = IdentityMark(learned=False)


def added_with(default: Any) -> IdentityMark:
    return IdentityMark(added_with=(default,))


def identity_view(owner: type[BaseModel] | None, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (the dumped or raw form of an `owner` spec) without the fields its marks leave out of a run's id,
    at every depth."""
    view = {}
    for key, value in data.items():
        info = field_info(owner, key)
        mark = next((m for m in getattr(info, "metadata", ()) if isinstance(m, IdentityMark)), IdentityMark())
        if not mark.learned or (mark.added_with and value == mark.added_with[0]):
            continue
        view[key] = identity_view(field_class(owner, key, value), value) if isinstance(value, dict) else value
    return view


def field_info(owner: type[BaseModel] | None, name: str):
    if owner is None:
        return None
    return owner.model_fields.get(attribute(owner, name))


def attribute(owner: type[BaseModel], name: str) -> str:
    """The field that `name` (a field name or an alias, such as budget's `shape`) refers to."""
    for field_name, info in owner.model_fields.items():
        if info.alias == name:
            return field_name
    return name


def field_names(owner: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in owner.model_fields.items()}


def field_class(owner: type[BaseModel] | None, name: str, value: dict[str, Any]) -> type[BaseModel] | None:
    """The spec class of field `name` of `owner` holding `value`: the variant its discriminator names for a
    union. None where it is not a spec (a free mapping such as a study's `base`)."""
    info = field_info(owner, name)
    if info is None:
        return None
    annotation = info.annotation  # a spec class, or a union of them (with None)
    members = [annotation] if isinstance(annotation, type) else list(getattr(annotation, "__args__", ()))
    members = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    if info.discriminator:
        tag = value.get(info.discriminator)
        members = [m for m in members if m.model_fields[info.discriminator].default == tag]
    return members[0] if len(members) == 1 else None
