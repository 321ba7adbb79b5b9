"""Per-model training checkpoints that a killed job resumes from, never pickled.

    <checkpoint-dir>/<model>/epoch-0003.safetensors   model, EMA and optimizer tensors
    <checkpoint-dir>/<model>/state.json               epoch, step, history, run setup, which tensor file

Each file is written to a temporary name, fsynced and renamed into place. The
tensor file of an epoch is written first and `state.json` last, so `state.json`
always names a complete tensor file: a job killed at any moment resumes from its
last finished epoch.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    """What a resumed run needs: the tensors plus the JSON scalars next to them."""

    epoch: int  # checkpoints saved in this directory, this one included (trainer.train saves one per epoch: its last epoch)
    step: int  # optimizer steps taken so far
    history: list[dict]
    run: dict  # architecture, recipe and dataset this run was started with (checked on resume)
    model: dict[str, torch.Tensor]
    optimizer: dict  # a torch optimizer state_dict
    ema: dict[str, torch.Tensor] | None = None
    published_version: int | None = None


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split a torch optimizer state_dict into flat tensors ("optimizer.<param>.<key>") and JSON param groups."""
    tensors = {}
    for param, state in state_dict["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):  # Adam keeps even `step` as a tensor
                raise TypeError(f"optimizer state {param}.{key} is not a tensor; cannot store it in safetensors")
            tensors[f"optimizer.{param}.{key}"] = value
    return tensors, state_dict["param_groups"]


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    """The inverse of `_optimizer_to_tensors`; `tensors` are keyed "<param>.<key>" (prefix removed)."""
    state: dict[int, dict] = defaultdict(dict)
    for name, value in tensors.items():
        param, key = name.split(".", 1)
        state[int(param)][key] = value  # the optimizer matches its parameters by these integer ids
    return {"state": dict(state), "param_groups": param_groups}


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    optimizer_tensors, param_groups = _optimizer_to_tensors(checkpoint.optimizer)
    tensors = {f"model.{k}": v for k, v in checkpoint.model.items()}
    tensors |= {f"ema.{k}": v for k, v in (checkpoint.ema or {}).items()}
    tensors |= optimizer_tensors
    tensor_file = f"epoch-{checkpoint.epoch:04d}.safetensors"
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _replace_atomically(directory / tensor_file, lambda tmp: save_file(contiguous, tmp))
    state = {
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "tensors": tensor_file,
        "history": checkpoint.history,
        "run": checkpoint.run,
        "optimizer_param_groups": param_groups,
        "has_ema": checkpoint.ema is not None,
        "published_version": checkpoint.published_version,
    }
    _replace_atomically(directory / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=2)))
    for old in directory.glob("epoch-*.safetensors"):  # earlier epochs (and any a killed job left half-written)
        if old.name != tensor_file:
            old.unlink(missing_ok=True)


def mark_published(directory: Path, version: int) -> None:
    """Record in state.json that this run's model is in the store, so a resume does not publish it twice."""
    state = json.loads((directory / STATE_FILE).read_text())
    state["published_version"] = version
    _replace_atomically(directory / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=2)))


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The last finished epoch's checkpoint in `directory`, or None if there is none."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    tensors = load_file(directory / state["tensors"])

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    return Checkpoint(
        epoch=state["epoch"],
        step=state["step"],
        history=state["history"],
        run=state["run"],
        model=section("model."),
        optimizer=_optimizer_from_tensors(section("optimizer."), state["optimizer_param_groups"]),
        ema=section("ema.") if state["has_ema"] else None,
        published_version=state.get("published_version"),
    )
