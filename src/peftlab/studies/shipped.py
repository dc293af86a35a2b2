"""Studies that ship with peftlab (package data under peftlab/catalog/studies)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from peftlab.errors import PeftlabError


def shipped_studies() -> dict[str, Path]:
    folder = files("peftlab.catalog").joinpath("studies")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def shipped_study(name: str) -> Path:
    studies = shipped_studies()
    if name not in studies:
        raise PeftlabError(f"unknown study {name!r}: not a file; shipped studies are {', '.join(sorted(studies))}")
    return studies[name]
