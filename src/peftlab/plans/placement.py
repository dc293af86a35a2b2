"""Placement: which sites of which layers get adapted. Roles come from the architecture's table;
layers from a selector (`upper-half`, `every-2nd`, `last-4`, `0,2,5`, ...)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from peftlab.errors import PeftlabError
from peftlab.models.roles import FUSED_PARTS, GROUPS, parse_roles

if TYPE_CHECKING:  # sites are torch-side; validating a placement must not import torch
    from peftlab.models.sites import ModelSites, Site
    from peftlab.specs import PlacementSpec


def _thirds(n: int) -> tuple[int, int]:
    return round(n / 3), round(2 * n / 3)


# Named selectors: n_layers -> layer indices. Halves split at n // 2, so lower + upper = all.
LAYER_SELECTORS: dict[str, Callable[[int], range]] = {
    "all": lambda n: range(n),
    "lower-half": lambda n: range(0, n // 2),
    "upper-half": lambda n: range(n // 2, n),
    "lower-third": lambda n: range(0, _thirds(n)[0]),
    "middle-third": lambda n: range(*_thirds(n)),
    "upper-third": lambda n: range(_thirds(n)[1], n),
}
_EVERY = re.compile(r"every-(\d+)(?:st|nd|rd|th)?(?:\+(\d+))?")  # every-2nd = 0,2,4..; every-2nd+1 = 1,3,5..
_FIRST_LAST = re.compile(r"(first|last)-(\d+)")
_EXPLICIT = re.compile(r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*")
_LAYER_HELP = (
    "valid: all, lower-half, upper-half, lower-third, middle-third, upper-third, every-2nd, "
    "every-2nd+1, first-K, last-K, or indices such as 0,2,5 or 0-3"
)


def validate_layer_selector(selector: str | list[int]) -> None:
    """Check the syntax (ranges are checked against the model later). Raises ValueError."""
    if isinstance(selector, list):
        if not selector:
            raise ValueError("empty layer list; " + _LAYER_HELP)
        if any(i < 0 for i in selector):
            raise ValueError(f"negative layer index in {selector}; layers count from 0")
        return
    text = selector.replace(" ", "")
    if text in LAYER_SELECTORS or _FIRST_LAST.fullmatch(text) or _EXPLICIT.fullmatch(text):
        return
    every = _EVERY.fullmatch(text)
    if every and int(every.group(1)) >= 1:
        return
    raise ValueError(f"unknown layer selector {selector!r}; {_LAYER_HELP}")


def select_layers(selector: str | list[int], n_layers: int) -> list[int]:
    """Layer indices chosen by `selector` on a model with `n_layers` layers."""
    validate_layer_selector(selector)
    if isinstance(selector, list):
        chosen = list(selector)
    else:
        text = selector.replace(" ", "")
        if text in LAYER_SELECTORS:
            chosen = list(LAYER_SELECTORS[text](n_layers))
        elif m := _EVERY.fullmatch(text):
            step, offset = int(m.group(1)), int(m.group(2) or 0)
            chosen = list(range(offset, n_layers, step))
        elif m := _FIRST_LAST.fullmatch(text):
            k = int(m.group(2))
            if not 1 <= k <= n_layers:
                raise PeftlabError(f"placement.layers: {text} needs 1 <= K <= {n_layers} (the model has {n_layers} layers)")
            chosen = list(range(k)) if m.group(1) == "first" else list(range(n_layers - k, n_layers))
        else:
            chosen = []
            for part in text.split(","):
                lo, _, hi = part.partition("-")
                chosen.extend(range(int(lo), int(hi or lo) + 1))
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        raise PeftlabError(
            f"placement.layers: layer index {bad[0]} is out of range; the model has {n_layers} layers (0-{n_layers - 1})"
        )
    if not chosen:
        raise PeftlabError(f"placement.layers: {selector!r} selects no layer of a {n_layers}-layer model")
    return sorted(set(chosen))


def _match_modules(whole: list[Site], patterns: list[str]) -> tuple[set[str], list[str]]:
    """PEFT-style names (a path or a path suffix) -> module paths, with warnings for names that
    span several roles (GPT-2 `c_proj` is both attn.o and ffn.down)."""
    paths: set[str] = set()
    warnings: list[str] = []
    for pattern in (p.strip() for p in patterns if p.strip()):
        hits = [s for s in whole if s.path == pattern or s.path.endswith("." + pattern)]
        if not hits:
            examples = ", ".join(sorted({s.path.rsplit(".", 1)[-1] for s in whole}))
            raise PeftlabError(f"placement.modules: {pattern!r} matches no adaptable module; names here: {examples}")
        roles = sorted({s.role.value for s in hits})
        if len(roles) > 1:
            examples = ", ".join(sorted({s.path for s in hits})[:2])
            warnings.append(
                f"module name {pattern!r} is ambiguous: it matches roles {' and '.join(roles)} "
                f"(e.g. {examples}); select by role instead (placement.roles)"
            )
        paths |= {s.path for s in hits}
    return paths, warnings


def select_sites(model_sites: ModelSites, spec: PlacementSpec) -> tuple[list[Site], list[str]]:
    """The sites a placement adapts, and warnings for the user.

    A fused q/k/v projection is adapted whole (`attn.qkv`) when q, k and v are all selected (unless
    `spec.fused` is `parts`), and as output slices when only some are (e.g. q and v, as in the LoRA paper's
    GPT-2 runs).
    """
    layers = set(select_layers(spec.layers, model_sites.n_layers))
    if spec.roles is not None:
        roles = parse_roles(spec.roles)
    else:
        roles = GROUPS["all"]
    by_module: dict[str, list[Site]] = defaultdict(list)
    for site in model_sites.sites:
        by_module[site.path].append(site)
    whole = [s for s in model_sites.sites if not s.is_slice]
    warnings: list[str] = []
    allowed = None
    if spec.modules:
        allowed, warnings = _match_modules(whole, spec.modules)
    chosen: list[Site] = []
    for path, sites in by_module.items():
        module = next(s for s in sites if not s.is_slice)
        if module.layer not in layers or (allowed is not None and path not in allowed):
            continue
        if module.role in FUSED_PARTS:
            parts = [s for s in sites if s.is_slice and s.role in roles]
            every = len(parts) == len(sites) - 1
            chosen.extend([module] if every and spec.fused == "whole" else parts)
        elif module.role in roles:
            chosen.append(module)
    if not chosen:
        present = sorted({s.role.short for s in whole}, key=lambda r: r)
        raise PeftlabError(
            f"placement matches no site: roles={spec.roles or 'all'}, layers={spec.layers}"
            + (f", modules={spec.modules}" if spec.modules else "")
            + f"; this {model_sites.model_type} model has roles {', '.join(present)} in layers 0-{model_sites.n_layers - 1}"
        )
    return chosen, warnings
