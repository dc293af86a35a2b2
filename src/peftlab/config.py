"""Validated, frozen specs, YAML in and out. Every error names the file and the field path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftlab.errors import PeftlabError
from peftlab.models.roles import Role, parse_role, parse_roles
from peftlab.plans.allocation import AllocationSpec, UniformAllocation, parse_allocation
from peftlab.plans.placement import validate_layer_selector


T = TypeVar("T", bound=BaseModel)


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


class ModelSpec(Spec):
    name: str = "minilm-l6"
    """A preset (minilm-l6, gemma-3-270m, tiny-*), a catalog architecture, a local directory or a Hugging Face id."""
    head: Literal["auto", "causal-lm", "sequence-classification", "base"] = "auto"
    """Which head to build: auto = sequence classification for encoders, causal LM for decoders."""
    num_labels: int = Field(2, ge=2)
    revision: str | None = None
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless the user turns it on."""
    role_map: dict[str, Role] | None = None
    """For architectures peftlab does not know: regex over full module paths -> role."""

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
    allocation: AllocationSpec = UniformAllocation()
    alpha: AlphaSpec = AlphaSpec()

    @field_validator("allocation", mode="before")
    @classmethod
    def _parse_allocation(cls, value: Any) -> Any:
        return parse_allocation(value) if isinstance(value, (str, int)) else value


class PlanConfig(Spec):
    """What `peftlab plan --config` reads: a model and a plan."""

    model: ModelSpec = ModelSpec()
    plan: PlanSpec = PlanSpec()


def format_validation_error(exc: ValidationError, source: str) -> str:
    """The first error as `source: field.path: message`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{source}: {loc}: {msg}"


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the discriminator value or a function name into the location of union members
    return isinstance(part, str) and (part.startswith("function-") or part in _UNION_TAGS)


_UNION_TAGS = {"uniform", "linear", "role-weighted", "budget", "from-scores", "str", "int", "list[str]"}


def validate(cls: type[T], data: Any, source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise PeftlabError(format_validation_error(exc, source)) from None


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PeftlabError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PeftlabError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftlabError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_spec(cls: type[T], path: Path, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file into `cls`, applying dotted-path overrides (from CLI flags) first."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return validate(cls, data, str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if isinstance(child, str):  # a shorthand such as `model: tiny-gpt2` or `placement: ffn`
            child = {"name" if part == "model" else "roles": child}
        node[part] = child = child if isinstance(child, dict) else {}
        node = child
    node[last] = value
