"""Sites: every adaptable linear module of a model, with its layer, role and shape."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError
from peftlab.models.architectures import Family, Fused, family_for, supported_model_types
from peftlab.models.roles import FUSED_PARTS, Role, whole_role


@dataclass(frozen=True)
class Site:
    path: str  # module path in the model (the module an adapter wraps)
    layer: int
    role: Role
    in_features: int
    out_features: int  # width this site writes: a slice's width for one part of a fused projection
    kind: str  # "linear" or "conv1d" (GPT-2's transposed-weight linear)
    out_slice: tuple[int, int] | None = None  # [start, stop) in the module's output; None = whole

    @property
    def key(self) -> str:
        """Unique name: the path, plus the role for a slice of a fused projection."""
        return f"{self.path}:{self.role.short}" if self.out_slice else self.path

    @property
    def is_slice(self) -> bool:
        return self.out_slice is not None


@dataclass(frozen=True)
class ModelSites:
    """All candidate sites of a model. Fused q/k/v modules appear once as `attn.qkv` (whole)
    and once per part as slices; placement picks one form or the other."""

    model_type: str
    family: str
    n_layers: int
    sites: tuple[Site, ...]


def linear_shape(module: nn.Module) -> tuple[int, int, str] | None:
    """(in_features, out_features, kind) of a linear-like module, else None."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], "conv1d"
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, "linear"
    return None


def _fused_sites(path: str, layer: int, fused: Fused, fan_in: int, fan_out: int, kind: str, config) -> list[Site]:
    """The whole module, then one slice per part at its own offset and width."""
    if fused.widths is not None:
        widths = tuple(fused.widths(config))
        if sum(widths) != fan_out:
            raise PeftlabError(f"{path}: fused output width {fan_out} is not the parts' "
                               f"{' + '.join(map(str, widths))} computed from the model's config")
    else:
        if fan_out % len(fused.parts):
            raise PeftlabError(f"{path}: fused output width {fan_out} does not split into {len(fused.parts)} equal parts")
        widths = (fan_out // len(fused.parts),) * len(fused.parts)
    sites = [Site(path, layer, whole_role(fused.parts), fan_in, fan_out, kind)]
    start = 0
    for role, width in zip(fused.parts, widths):
        sites.append(Site(path, layer, role, fan_in, width, kind, (start, start + width)))
        start += width
    return sites


def _site_rows(path: str, layer: int, role: Role | Fused, shape: tuple[int, int, str], config=None) -> list[Site]:
    fan_in, fan_out, kind = shape
    if isinstance(role, Fused):
        return _fused_sites(path, layer, role, fan_in, fan_out, kind, config)
    if role in FUSED_PARTS:  # a role_map naming a fused module: equal parts in the usual order
        return _fused_sites(path, layer, Fused(FUSED_PARTS[role]), fan_in, fan_out, kind, config)
    return [Site(path, layer, role, fan_in, fan_out, kind)]


def _resolve_family(model: nn.Module, family: Family) -> list[Site]:
    layer_re = re.compile(family.layer_pattern)
    modules = dict(model.named_modules())
    sites: list[Site] = []
    for block_path in modules:
        match = layer_re.search(block_path)
        if not match:
            continue
        layer = int(match.group(1))
        for rel, role in family.roles.items():
            module = modules.get(f"{block_path}.{rel}")
            shape = linear_shape(module) if module is not None else None
            if shape is not None:
                sites.extend(_site_rows(f"{block_path}.{rel}", layer, role, shape, model.config))
    return sites


def _layer_of(path: str, match: re.Match) -> int | None:
    if "layer" in match.groupdict():
        return int(match.group("layer"))
    numbers = [p for p in path.split(".") if p.isdigit()]
    return int(numbers[0]) if numbers else None


def _resolve_role_map(model: nn.Module, role_map: Mapping[str, Role]) -> list[Site]:
    compiled = [(re.compile(pattern), role) for pattern, role in role_map.items()]
    sites: list[Site] = []
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None:
            continue
        for pattern, role in compiled:
            match = pattern.fullmatch(path)
            if match:
                layer = _layer_of(path, match)
                if layer is None:
                    raise PeftlabError(
                        f"role_map: {pattern.pattern!r} matched {path}, which has no layer index; "
                        "add a (?P<layer>\\d+) group"
                    )
                sites.extend(_site_rows(path, layer, role, shape))
                break
    return sites


def linear_module_summary(model: nn.Module, limit: int = 12) -> list[str]:
    """Distinct linear module paths with layer indices folded to {i}, with shapes."""
    seen: dict[str, str] = {}
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            folded = re.sub(r"\.\d+(?=\.|$)", ".{i}", path)
            seen.setdefault(folded, f"{folded} ({shape[2]} {shape[0]}->{shape[1]})")
    rows = list(seen.values())
    return rows[:limit] + ([f"... and {len(rows) - limit} more"] if len(rows) > limit else [])


def resolve_sites(model: nn.Module, role_map: Mapping[str, Role] | None = None) -> ModelSites:
    """Every adaptable linear site of `model`, by role.

    Uses the architecture's role table, or `role_map` (regex over full module paths -> role) when
    given. An unknown architecture raises an error that lists the model's linear modules.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if role_map:
        sites, family_name = _resolve_role_map(model, role_map), "role_map"
        if not sites:
            raise PeftlabError(
                "role_map matched no linear module; the model has: " + "; ".join(linear_module_summary(model))
            )
    else:
        family = family_for(model_type)
        if family is None:
            example = "model:\n  role_map:\n    'blocks\\.(?P<layer>\\d+)\\.attn\\.wq': attn.q\n    ..."
            raise PeftlabError(
                f"unknown architecture {model_type!r} (supported: {', '.join(supported_model_types())}); "
                f"its linear modules are: {'; '.join(linear_module_summary(model))}. "
                f"Map them to roles in the config, e.g.\n{example}"
            )
        sites, family_name = _resolve_family(model, family), family.name
        if not sites:
            raise PeftlabError(f"{model_type}: no layer matched the {family.name} role table")
    layers = sorted({s.layer for s in sites})
    n_layers = getattr(config, "num_hidden_layers", None) or (layers[-1] + 1)
    return ModelSites(model_type, family_name, int(n_layers), tuple(sorted(sites, key=_site_order)))


_ROLE_ORDER = {role: i for i, role in enumerate(Role)}


def _site_order(site: Site) -> tuple[int, int, str]:
    return site.layer, _ROLE_ORDER[site.role], site.path


def model_family(model: nn.Module) -> Family | None:
    """The family table of a model (a PEFT wrapper included), or None for one peftlab has no table for."""
    return family_for(getattr(getattr(model, "config", None), "model_type", ""))


def layer_blocks(model: nn.Module) -> tuple[nn.ModuleList, list[str]] | None:
    """The model's stack of layer blocks with their module paths (a PEFT wrapper included), or None
    for an architecture peftlab has no table for."""
    family = model_family(model)
    if family is None:
        return None
    pattern = re.compile(family.layer_pattern)
    found = sorted((int(m.group(1)), path) for path, _ in model.named_modules() if (m := pattern.search(path)))
    if not found:
        return None
    paths = [path for _, path in found]
    parent = model.get_submodule(paths[0].rsplit(".", 1)[0])
    return (parent, paths) if isinstance(parent, nn.ModuleList) and len(parent) == len(paths) else None
