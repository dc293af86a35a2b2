"""Writing files so that a reader never sees half of one (concurrent study runs may write the same cache)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
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


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a data file, by its kind, without opening it (a FIFO would block the
    open, a device such as /dev/zero never ends); None for a regular file (or a link to one)."""
    try:
        mode = path.stat().st_mode  # follows links; a link loop or a dangling link fails here
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot read: {exc.strerror or type(exc).__name__}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a regular file")
    return f"is {kind}; give a regular file"


def require_file(path: Path, what: str = "") -> None:
    """`path` is a regular file; else one line naming it (and `what` field it came from) and its kind."""
    problem = file_problem(path)
    if problem is not None:
        raise PeftlabError(f"{what + ': ' if what else ''}{path}: {problem}")


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


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes while the block runs (a lock file beside it), so that of a
    study's runs started together one computes a cache file and the others wait and read it. Where the platform
    has no `fcntl`, no lock: the runs compute the same file and the last rename wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
