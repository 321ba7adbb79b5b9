"""What every training recipe shares: its common flags and their checks, the device and precision, loading a published
version, the resume check, the training clock, the manifest's common part and the publish path.

The recipes themselves read top to bottom in their own scripts: `trainer/train.py` (the 8x8 CIFAR upgraders, epochs,
DDP) and `trainer/photo.py` (the x4 photo model, steps over random crops). Each builds its parser from these helpers,
its run setup (what a resume must match and the manifest records), its unit of training and its evaluation, runs
them in `trainer.loop`'s loop and publishes through `publish_version`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from model_store import LATEST, ModelStore, StoreError
from trainer.checkpoint import mark_published
from upgrader.architectures import parameter_count
from upgrader.cpus import native_bf16_cpu

log = logging.getLogger("trainer.engine")

# A step that takes this many times the usual is a stall (the process stopped or starved), not training time.
STALL_FACTOR = 20.0


# ---- flags ---------------------------------------------------------------------------------------------------


def logfmt(fields: dict, prefix: str = "") -> str:
    """`key=value ...` for one structured log line (floats to 6 significant digits)."""
    return " ".join(f"{prefix}{k}={v:.6g}" if isinstance(v, float) else f"{prefix}{k}={v}" for k, v in fields.items())


def json_object(text: str) -> dict:
    """argparse type of a JSON object flag (e.g. --arch-params)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"width\": 64}}', got {text!r}")
    return value


def add_store_arguments(group: argparse._ArgumentGroup, cache_what: str) -> None:
    """--cache-dir and --store."""
    group.add_argument("--cache-dir", type=Path, default=None, help=f"{cache_what} cache (default: $UPGRADER_CACHE or ./.cache/datasets)")
    group.add_argument("--store", default=None,
                       help="model store: a directory or s3://bucket/prefix (default: $UPGRADER_STORE or ./store; S3 credentials from AWS_*)")


def add_device_arguments(group: argparse._ArgumentGroup, amp_default: str, amp_help: str) -> None:
    """--device and --amp (none, bf16, or auto: bf16 where the device computes it natively)."""
    group.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when present")
    group.add_argument("--amp", choices=["none", "bf16", "auto"], default=amp_default, help=amp_help)


def add_checkpoint_arguments(group: argparse._ArgumentGroup, when: str, resume_help: str) -> None:
    """--checkpoint-dir and --resume."""
    group.add_argument("--checkpoint-dir", type=Path, default=None, help=f"write a checkpoint {when} here")
    group.add_argument("--resume", action="store_true", help=resume_help)


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace, checks: list[tuple[str, object, bool]]) -> None:
    """The checks every recipe makes (--device cuda needs CUDA, --resume needs --checkpoint-dir), then `checks`:
    (flag, value, whether it is in range) each; the first failure ends the program with argparse's message."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA device")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    for flag, value, ok in checks:
        if not ok:
            parser.error(f"{flag} {value} is out of range")


# ---- device, precision, published weights --------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    """--device: auto is CUDA when torch sees it, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (CUDA that supports it; a CPU with AVX512-BF16 or AMX)."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16_cpu()


def wants_bf16(amp: str, device: torch.device) -> bool:
    """--amp: bf16 autocast of the training forward, or auto: where `device` computes bf16 natively."""
    return amp == "bf16" or (amp == "auto" and native_bf16(device))


def load_published(flag: str, spec: str, store: ModelStore) -> tuple[str, dict, dict]:
    """A NAME[:VERSION] flag's published weights (latest without a version), checksum-verified: (name, state_dict,
    manifest). An unknown model or version, or weights that fail their checksum, become a ValueError naming the flag."""
    name, _, version = spec.partition(":")
    try:
        state_dict, manifest = store.load_state_dict(name, version or LATEST)
    except StoreError as exc:
        raise ValueError(f"{flag} {spec}: {exc}") from None
    return name, state_dict, manifest


# ---- the resume check, a step, the clock ---------------------------------------------------------------------


def setup_changes(saved: dict, wanted: dict, resumable: set[str]) -> list[str]:
    """How two run setups differ, as `key: saved -> wanted` for each differing entry; the recipe's entries are
    compared one by one, except those in `resumable` (what a resumed run may change: how long it runs)."""

    def entries(run: dict) -> dict:
        recipe = {k: v for k, v in run.get("recipe", {}).items() if k not in resumable}
        return {**{k: v for k, v in run.items() if k != "recipe"}, **recipe}

    saved, wanted = entries(saved), entries(wanted)
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]


def check_resumable(saved: dict, wanted: dict, resumable: set[str], where: Path) -> None:
    """Refuse to continue a checkpoint whose run setup is not `wanted` (a different experiment)."""
    changes = setup_changes(saved, wanted, resumable)
    if changes:
        raise ValueError(f"cannot resume from {where}: the run there used a different setup ({', '.join(changes)})")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, inputs: torch.Tensor,
                   targets: torch.Tensor, loss_fn, amp: bool) -> torch.Tensor:
    """One training step at learning rate `lr`: the forward (bf16 autocast with `amp`), the loss of the float32
    outputs against `targets`, the backward and the update. Returns the loss, detached, on the device (no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(inputs)
    loss = loss_fn(outputs.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class TrainingClock:
    """Training time, step by step: a step that took more than STALL_FACTOR times the usual (the process was
    stopped by SIGSTOP, its VM suspended, or it was starved) trained nothing, so it counts as a usual one and does
    not spend a time budget or move a time-based schedule on."""

    def __init__(self, spent_s: float = 0.0) -> None:
        self.spent_s, self.typical_s, self._started = spent_s, None, 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, step: int) -> float:
        """End the step started last; returns the seconds it counts for."""
        step_s = time.perf_counter() - self._started
        if self.typical_s is not None and step_s > STALL_FACTOR * self.typical_s:
            log.warning("event=stall step=%d seconds=%.1f counted=%.2f", step, step_s, self.typical_s)
            step_s = self.typical_s
        self.typical_s = step_s if self.typical_s is None else 0.9 * self.typical_s + 0.1 * step_s
        self.spent_s += step_s
        return step_s


# ---- publishing ----------------------------------------------------------------------------------------------


def base_manifest(run: dict, model: nn.Module, args: argparse.Namespace, device: torch.device, *, history: list[dict],
                  metrics: dict, evaluation: str, wall_time_s: float) -> dict:
    """The manifest entries every recipe writes: its run setup (architecture, recipe, dataset, ...), the model's size,
    the metrics and how they were measured, the history, the flags, and where and how long it trained."""
    return {
        **run,
        "parameter_count": parameter_count(model),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": history,
        "metrics": metrics,
        "evaluation": evaluation,
        "device": device.type,
        "wall_time_s": wall_time_s,  # training time, over resumed runs too
        "torch_version": torch.__version__,
    }


def publish_version(store_location: str | None, name: str, model: nn.Module, manifest: dict, files: dict[str, bytes],
                    checkpoint_dir: Path | None = None) -> int:
    """Publish `model`'s weights as a new version of `name` with its manifest and pictures; with `checkpoint_dir`,
    mark the checkpoint there as published (a resume then has nothing new to publish). Returns the version."""
    store = ModelStore(store_location)
    version = store.publish(name, model.state_dict(), manifest, files=files)
    if checkpoint_dir is not None and (checkpoint_dir / "state.json").is_file():
        mark_published(checkpoint_dir, version)
    log.info("event=published model=%s version=%d store=%s", name, version, store.url)
    return version
