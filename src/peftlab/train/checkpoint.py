"""Training checkpoints (`train.checkpoint_every`): a run killed at any moment starts again from its last
checkpoint and ends with the metrics the uninterrupted run would have.

A checkpoint holds what the next step depends on: the trainable parameters, the optimizer and scheduler state,
the random generators (dropout), and the loop's counters. The data order needs no state of its own: the batch
sampler is seeded, so a resumed run draws the same batches again and skips the ones already trained on.

Each checkpoint is written into its own directory, then `latest` is pointed at it with an atomic rename, so a
kill while writing leaves the previous checkpoint intact. What a resume reads is verified first (`verify`):
a checkpoint damaged some other way (a truncated file, a foreign optimizer state, a step past the run's end)
is reported as `DamagedCheckpoint`, naming the file, and the run starts over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.files import save_tensors_atomic, write_atomic

LATEST = "latest"
COUNTERS = {"seconds": (int, float), "tokens": int, "positions": int, "final_loss": (int, float), "window": list}


def same_training(saved: str, config: str) -> bool:
    """Whether two run configs (YAML) train the same steps: equal but for `train.stop_at` (a run stopped at a
    rung resumes under the config without it)."""
    def without_stop(text: str) -> Any:
        data = yaml.safe_load(text)
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data["train"].pop("stop_at", None)
        return data

    return without_stop(saved) == without_stop(config)


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


class Checkpoints:
    """The checkpoints of one run, in `directory` (inside the run's `.partial` directory)."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory = directory
        self.every = every

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def save(self, step: int, model: nn.Module, optimizer, scheduler, counters: dict[str, Any]) -> None:
        folder = self.directory / f"step-{step:08d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        trainable = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_tensors_atomic(folder / "trainable.safetensors", trainable)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"cpu": torch.get_rng_state(), "cuda": cuda}, folder / "rng.pt")
        (folder / "state.json").write_text(json.dumps({"step": step, **counters}))
        write_atomic(self.directory / LATEST, folder.name)  # the checkpoint exists once this names it
        for old in self.directory.glob("step-*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The folder `latest` names, when it holds a state.json (nothing is verified)."""
        pointer = self.directory / LATEST
        try:
            folder = self.directory / pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return folder if folder.name and (folder / "state.json").is_file() else None

    def latest_step(self) -> int:
        """The step of the latest checkpoint (0: none, or none whose state.json can be read)."""
        folder = self.latest()
        try:
            step = json.loads((folder / "state.json").read_text())["step"] if folder is not None else 0
        except (OSError, ValueError, TypeError, KeyError):
            return 0
        return step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 0

    def verify(self, total_steps: int) -> int:
        """The latest checkpoint's step after opening every file a resume reads (memory-mapped: `restore` reads
        them), checking sizes, types and that it lies inside a run of `total_steps`; 0 when there is no
        checkpoint. DamagedCheckpoint otherwise."""
        if not (self.directory / LATEST).exists():
            return 0
        folder = self.latest()
        if folder is None:
            raise DamagedCheckpoint(f"{self.directory / LATEST}: names no checkpoint with a state.json")
        state = _read(folder / "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or not 0 < step < total_steps:
            raise DamagedCheckpoint(f"{folder / 'state.json'}: step {step!r} is not a step inside this run of "
                                    f"{total_steps} steps")
        for key, kind in COUNTERS.items():
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                raise DamagedCheckpoint(f"{folder / 'state.json'}: {key} is {state.get(key)!r}")
        trainable = _read(folder / "trainable.safetensors", _tensor_names)
        optimizer = _read(folder / "optimizer.pt", _mapped)
        groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups) \
                or sum(len(g["params"]) for g in groups) != len(trainable) or not isinstance(optimizer.get("state"), dict):
            raise DamagedCheckpoint(f"{folder / 'optimizer.pt'}: not the optimizer state of the "
                                    f"{len(trainable)} trainable tensors saved beside it")
        if not isinstance(_read(folder / "scheduler.pt", _mapped), dict):
            raise DamagedCheckpoint(f"{folder / 'scheduler.pt'}: not a learning-rate scheduler's state")
        rng = _read(folder / "rng.pt", _mapped)
        cpu = rng.get("cpu") if isinstance(rng, dict) else None
        if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
            raise DamagedCheckpoint(f"{folder / 'rng.pt'}: not the state of torch's random generator")
        return step

    def restore(self, model: nn.Module, optimizer, scheduler) -> dict[str, Any] | None:
        """Load the latest checkpoint into the model, optimizer and scheduler and set the random generators;
        its step and counters, or None when there is none."""
        folder = self.latest()
        if folder is None:
            return None
        state = json.loads((folder / "state.json").read_text())
        saved = load_file(folder / "trainable.safetensors")
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if saved.keys() != parameters.keys():
            raise PeftlabError(f"{folder}: the checkpoint's trainable parameters differ from this run's; remove "
                               f"{self.directory} to start the run afresh")
        with torch.no_grad():
            for name, parameter in parameters.items():
                if saved[name].shape != parameter.shape:
                    raise PeftlabError(f"{folder}: {name} has shape {tuple(saved[name].shape)} in the checkpoint and "
                                       f"{tuple(parameter.shape)} in this run; remove {self.directory} to start afresh")
                parameter.copy_(saved[name])
        try:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise PeftlabError(f"{folder}: the optimizer or scheduler state does not fit this run ({exc}); remove "
                               f"{self.directory} to start afresh") from None
        rng = torch.load(folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return state

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _tensor_names(file: Path) -> list[str]:
    """The names in a safetensors file, from its header (which must cover the whole file): no tensor is read."""
    with safe_open(file, "pt") as tensors:
        return list(tensors.keys())


def _mapped(file: Path) -> Any:
    """A torch.save file's content, memory-mapped: checked without being read twice by a resume."""
    return torch.load(file, weights_only=True, mmap=True)


def _read(file: Path, load):
    """`load(file)`, or DamagedCheckpoint naming the file."""
    if not file.is_file():
        raise DamagedCheckpoint(f"{file}: missing")
    try:
        return load(file)
    except Exception as exc:  # each loader fails its own way on a truncated or foreign file
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DamagedCheckpoint(f"{file}: cannot be read ({reason})") from None


def history_rows(file: Path, step: int) -> list[str]:
    """The lines of a run's metrics.jsonl up to `step`, the history a run resumed from that step continues.
    A last line cut short (a kill while it was written) is dropped; anything else unreadable, or a missing
    file, is DamagedCheckpoint."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedCheckpoint(f"{file}: cannot be read ({exc.__class__.__name__})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            row_step = row["step"]
        except (ValueError, TypeError, KeyError):
            if number == len(lines):
                break
            raise DamagedCheckpoint(f"{file}: line {number} is not a metrics row") from None
        if not isinstance(row_step, int):
            raise DamagedCheckpoint(f"{file}: line {number} has step {row_step!r}")
        if row_step <= step:
            rows.append(line)
    return rows
