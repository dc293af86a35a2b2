"""Specs from YAML files and command-line overrides. Every error names the file and the field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from peftlab.errors import PeftlabError
from peftlab.fields import attribute, field_class, field_info, field_names
from peftlab.files import require_file
from peftlab.methods.specs import SPECS
from peftlab.plans.allocation import ALLOCATIONS
from peftlab.specs import Spec

T = TypeVar("T", bound=BaseModel)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """The first error as `source: field.path: message`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the discriminator value or a function name into the location of union members
    return isinstance(part, str) and (part.startswith("function-") or part in _UNION_TAGS)


_UNION_TAGS = {*ALLOCATIONS, *SPECS, "str", "int", "list[str]"}


def validate(cls: type[T], data: Any, source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise PeftlabError(format_validation_error(exc, source)) from None


def read_yaml(path: Path) -> Any:
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PeftlabError(f"{path}:{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise PeftlabError(f"{path}: nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftlabError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_spec(cls: type[T], path: Path, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file into `cls`, applying dotted-path overrides (from CLI flags) first."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(cls, data, dotted, value, str(path))
    return validate(cls, data, str(path))


def set_dotted(cls: type[Spec], data: dict[str, Any], dotted: str, value: Any, source: str = "config") -> None:
    """Set `dotted` in `data`, the raw (YAML) form of a `cls` spec, to `value`.

    A shorthand met on the way (`placement: [q, v]`, `task: reviews`, `method: qlora`, `alpha: 16`,
    `allocation: attention-heavy(8)`) is first expanded by its own spec into the mapping it stands for,
    so that setting one field keeps the others. A field the chosen variant does not have (`rank` of a
    `linear` allocation) is an error that names the conflict, never a silent replacement.
    """
    *parents, last = dotted.split(".")
    node, owner = data, cls
    for depth, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            child = _expanded(cls, parents[: depth + 1], child, owner, source)
        node[part] = child
        node, owner = child, field_class(owner, part, child)
    if owner is not None and isinstance(node, dict) and field_names(owner) and last not in field_names(owner):
        where = ".".join(parents)
        kind = next((repr(node[k]) for k in ("kind", "name") if k in node), owner.__name__)
        raise PeftlabError(f"{source}: {dotted}: {where} is {kind}, which has no field {last!r} "
                           f"(its fields: {', '.join(sorted(field_names(owner)))}); set {where} as a whole instead")
    node[last] = value


def _expanded(root: type[Spec], path: list[str], value: Any, owner: type[BaseModel] | None, source: str) -> dict[str, Any]:
    """The mapping a shorthand at `path` stands for, as its spec reads it; for a missing value, {} (or
    the default variant of a discriminated union, e.g. {kind: uniform})."""
    if value is None:
        info = field_info(owner, path[-1])
        default = getattr(info, "default", None)
        if info is not None and info.discriminator and isinstance(default, BaseModel):
            return {info.discriminator: getattr(default, info.discriminator)}
        return {}
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    parsed: Any = validate(root, nested, source)
    for part in path:
        parsed = getattr(parsed, attribute(type(parsed), part))
    if not isinstance(parsed, BaseModel):
        raise PeftlabError(f"{source}: {'.'.join(path)}: {value!r} is not a mapping; cannot set a field inside it")
    return parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
