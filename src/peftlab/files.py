"""Writing files so that a reader never sees half of one (concurrent study runs may write the same cache)."""

from __future__ import annotations

import os
from pathlib import Path

from peftlab.errors import PeftlabError


def check_output(path: Path, option: str, *, directory: bool) -> None:
    """Before any work: `path` can be written as a file (`directory` False) or made a directory. Names the
    option and what is in the way (a file where a folder is needed, a folder where a file is, no write access)."""
    if path.exists() and directory and not path.is_dir():
        raise PeftlabError(f"{option} {path}: is a file; give a directory")
    if path.exists() and not directory and path.is_dir():
        raise PeftlabError(f"{option} {path}: is a directory; give a file name, e.g. {path / 'out.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PeftlabError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PeftlabError(f"{option} {path}: no permission to write in {parent}")


def cache_dir() -> Path:
    """Per-user cache: $PEFTLAB_CACHE, else $XDG_CACHE_HOME/peftlab, else ~/.cache/peftlab."""
    if env := os.environ.get("PEFTLAB_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peftlab"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def save_tensors_atomic(path: Path, tensors: dict) -> None:
    """safetensors' save_file through a temporary file and a rename, like `write_atomic`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def tensor_bytes(tensor) -> bytes:
    """A tensor's raw bytes (any dtype, any device), for content digests of weights."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
