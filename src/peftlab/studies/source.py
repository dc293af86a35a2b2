"""Where a study comes from: a spec file, a shipped study's name, a study directory to resume, or a spec built in
Python; and the directory it runs in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftlab.config import load_spec, validate
from peftlab.errors import PeftlabError
from peftlab.specs import StudySpec
from peftlab.studies.grid import with_base_overrides
from peftlab.studies.shipped import shipped_study

StudySource = str | Path | StudySpec | Mapping[str, Any]


def study_spec(source: StudySource, study_dir: Path | None = None, data: Path | None = None,
               settings: list[str] | None = None) -> tuple[StudySpec, Path]:
    """(the spec, its directory) for `source`: a spec file, a shipped study name (placement, allocation, methods),
    a study directory to resume, a `StudySpec` or its mapping; with the base run config's data replaced by `data` and
    `settings` (KEY=VALUE) applied. The directory: `study_dir`, else the one resumed, else studies/<name>[-<data>]."""
    if isinstance(source, (StudySpec, Mapping)):
        spec = source if isinstance(source, StudySpec) else validate(StudySpec, dict(source), "study")
        spec = with_base_overrides(spec, data, settings or [])
        return spec, same_study(spec, study_dir or _default_dir(spec, data))
    path = Path(source)
    if path.is_dir():
        spec_file = path / "study.yaml"
        if not spec_file.is_file():
            raise PeftlabError(f"{path}: not a study directory (no study.yaml)")
        spec = with_base_overrides(load_spec(StudySpec, spec_file), data, settings or [])
        return spec, same_study(spec, study_dir or path)
    if not path.exists() and path.suffix == "":
        path = shipped_study(str(source))
    spec = with_base_overrides(load_spec(StudySpec, path), data, settings or [])
    return spec, same_study(spec, study_dir or _default_dir(spec, data))


def _default_dir(spec: StudySpec, data: Path | None) -> Path:
    return Path("studies") / (spec.name + (f"-{data.stem}" if data else ""))


def same_study(spec: StudySpec, study_dir: Path) -> Path:
    """`study_dir`, unless it holds another study (by name): its runs would be merged into that study's
    report."""
    import yaml

    held = study_dir / "study.yaml"
    if held.is_file():
        try:
            name = yaml.safe_load(held.read_text(encoding="utf-8")).get("name")
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError, OSError):
            raise PeftlabError(f"--dir {study_dir}: its study.yaml cannot be read; choose another --dir") from None
        if name != spec.name:
            raise PeftlabError(f"--dir {study_dir}: holds study {name!r}, not {spec.name!r}; choose another --dir, "
                               f"or rename the study (name: {name}) to extend it")
    return study_dir
