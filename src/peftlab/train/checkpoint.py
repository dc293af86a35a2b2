"""Training checkpoints (`train.checkpoint_every`): a run killed at any moment starts again from its last
checkpoint and ends with the metrics the uninterrupted run would have.

A checkpoint holds what the next step depends on: the trainable parameters, the optimizer and scheduler state,
the random generators (dropout), and the loop's counters. The data order needs no state of its own: the batch
sampler is seeded, so a resumed run draws the same batches again and skips the ones already trained on.

Each checkpoint is written into its own directory, then `latest` is pointed at it with an atomic rename, so a
kill while writing leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.files import save_tensors_atomic, write_atomic

LATEST = "latest"


class Checkpoints:
    """The checkpoints of one run, in `directory` (inside the run's `.partial` directory)."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory = directory
        self.every = every

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 and step < total_steps

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
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        folder = self.directory / pointer.read_text().strip()
        return folder if (folder / "state.json").is_file() else None

    def latest_step(self) -> int:
        """The step of the latest checkpoint (0: none yet)."""
        folder = self.latest()
        return json.loads((folder / "state.json").read_text())["step"] if folder is not None else 0

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
                parameter.copy_(saved[name])
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return state

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
