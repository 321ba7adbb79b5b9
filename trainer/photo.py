"""Train a x4 photo model for the standard degradation and publish it: `python -m trainer.photo`.

    python -m trainer.photo --natural ../shared/datasets/sr-natural --init-from upgrader:2 --init-store pretrained \\
        --checkpoint-dir runs/photo/checkpoints --resume --max-minutes 110 --threads 1 --store runs/photo/store

The recipe, top to bottom:

* data: the sr-natural photographs (BSDS300's 200 training images and T91, VDSR's training set) through
  `trainer.natural`, whose 30 held-out photographs are never trained on and are the validation set here;
* each step: `--batch-size` random HR crops of `--crop` x 4 pixels (uniform over every position of every
  photograph big enough), each in one of its 8 dihedral orientations; the LR input is MATLAB's antialiased
  bicubic reduction of the crop, 8-bit (`upgrader.imaging.bicubic_degrade`: the LR_bicubic_x4 images of every
  published x4 table, and the PNG a client sends); with `--degradation realistic` it is instead
  `upgrader.degradations`' random chain (a clean bicubic share; otherwise blur, bicubic/bilinear/area reduction,
  Gaussian or Poisson noise, JPEG), each crop's chain seeded by (seed, step, index); the crop, seeded by
  (seed, step), is the same on a resumed run;
* L1 loss, Adam, a cosine learning rate over `--steps` (or over `--max-minutes` of training time, whichever
  ends first, so a run cut short by its budget still ends annealed), an EMA of the weights (what is
  evaluated and published);
* every `--eval-every` steps: PSNR-Y (BT.601 luma, 4-pixel border cropped, 8-bit output) of the EMA weights on
  the held-out photographs, each upscaled whole in one forward, with bicubic beside it;
* a checkpoint every `--checkpoint-minutes` (and at the end) that `--resume` continues from;
* at the end: the EMA weights published to the model store with a manifest (architecture, recipe, degradation,
  held-out metrics, data lineage). `--publish-only` publishes the last checkpoint's EMA without training.

`--init-from NAME[:VERSION]` starts from a published `subpixel_residual` or `photo_residual` of the same width and
depth: its head, body and sub-pixel tail are loaded and anything else (e.g. subpixel_residual's global attention,
which this fully convolutional architecture leaves out) is dropped, and the manifest says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_store import ModelStore, StoreError
from trainer.engine import (TrainingClock, add_checkpoint_arguments, add_device_arguments, add_store_arguments,
                            base_manifest, check_common_args, json_object, load_published, logfmt, optimizer_step,
                            pick_device, publish_version, wants_bf16)
from trainer.loop import Task, Training, fit, publish_once
from trainer.natural import NaturalData, load_natural_data
from trainer.recipe import EMA, dihedral_augment
from upgrader.architectures import build_model, parameter_count
from upgrader.degradations import DegradationConfig, degrade_batch
from upgrader.imaging import bicubic_degrade, imresize_bicubic, psnr_y, to_8bit, to_float

log = logging.getLogger("trainer.photo")

SCALE = 4
DEGRADATION = "bicubic-matlab-x4"  # upgrader.imaging.bicubic_degrade; the CIFAR models' is antialiased bilinear
# --degradation realistic: upgrader.degradations' random chain (blur, bicubic/bilinear/area, noise, JPEG), a clean share
REALISTIC = "realistic-x4"
REALISTIC_CHAIN = DegradationConfig(scale=4)
EVALUATION = ("PSNR-Y (BT.601 luma, 8-bit output) with a 4-pixel border cropped, mean over the held-out photographs, "
              "each cropped to a multiple of 4, reduced by bicubic_degrade and upscaled whole in one forward")
# Entries of the run's setup a resumed run may change: how long it runs, not what it trains.
RESUMABLE_CHANGES = {"max_minutes"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.photo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("data and store")
    where.add_argument("--natural", type=Path, default=os.environ.get("UPGRADER_NATURAL_DATA") or None, metavar="DIR",
                       help="sr-natural photographs (bsd200/, yang91/) (default: $UPGRADER_NATURAL_DATA)")
    add_store_arguments(where, cache_what="decoded-photo")
    where.add_argument("--publish-as", default="photo", metavar="NAME", help="store name to publish under")
    where.add_argument("--init-from", default=None, metavar="NAME[:VERSION]",
                       help="start from a published subpixel_residual / photo_residual of the same width and depth")
    where.add_argument("--init-store", default=None, help="store --init-from reads (default: --store)")

    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--arch-params", type=json_object, default={"width": 64, "depth": 8}, metavar="JSON",
                        help="photo_residual's keyword arguments")
    recipe.add_argument("--crop", type=int, default=48, help="LR crop side; the HR crop is 4x that")
    recipe.add_argument("--batch-size", type=int, default=16, help="crops per optimizer step")
    recipe.add_argument("--steps", type=int, default=20000, help="optimizer steps the cosine schedule spans (a cap)")
    recipe.add_argument("--lr", type=float, default=2e-4, help="Adam's peak learning rate (cosine to 0)")
    recipe.add_argument("--warmup", type=int, default=100, help="steps of linear warm-up")
    recipe.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights that are evaluated and published")
    recipe.add_argument("--seed", type=int, default=0, help="seeds the crops, their orientation and a fresh init")
    recipe.add_argument("--degradation", choices=["bicubic", "realistic"], default="bicubic",
                        help="the LR inputs: bicubic = MATLAB's bicubic x4, 8-bit (the benchmark's); realistic = "
                             "upgrader.degradations' seeded chain of blur, downsampling, noise and JPEG, with a clean "
                             "bicubic share (photos as people have them)")
    recipe.add_argument("--chain", type=json.loads, default={}, metavar="JSON",
                        help="with --degradation realistic: DegradationConfig fields that differ from its defaults, e.g. "
                             "'{\"jpeg_prob\": 0.8, \"jpeg_quality\": [60, 95]}' (recorded in the manifest)")

    run = p.add_argument_group("how it runs")
    add_device_arguments(run, amp_default="auto", amp_help="bf16 autocast of the training forward; auto: where the device "
                                                             "computes bf16 natively (evaluation is always float32)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="training-time budget over resumed runs too; the cosine schedule ends at it when it comes first")
    run.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations")
    add_checkpoint_arguments(run, when="every --checkpoint-minutes and at the end, in <dir>/<publish-as>/,",
                             resume_help="continue from the checkpoint in --checkpoint-dir (fresh if none)")
    run.add_argument("--checkpoint-minutes", type=float, default=3.0, help="minutes between checkpoints")
    run.add_argument("--publish-only", action="store_true",
                     help="publish the checkpoint's EMA weights without training (a snapshot: safe while a run still trains there)")
    run.add_argument("--no-publish", action="store_true", help="train and checkpoint, publish nothing")
    run.add_argument("--log-every", type=int, default=50, help="steps between progress log lines")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.natural is None:
        parser.error("--natural is required (or set UPGRADER_NATURAL_DATA)")
    if args.publish_only and args.checkpoint_dir is None:
        parser.error("--publish-only needs --checkpoint-dir")
    if args.chain and args.degradation != "realistic":
        parser.error("--chain needs --degradation realistic")
    try:
        degradation_chain(args)
    except TypeError as exc:
        parser.error(f"--chain: {exc} (the fields: {', '.join(f.name for f in fields(DegradationConfig))})")
    check_common_args(parser, args, [
        ("--crop", args.crop, args.crop >= 8), ("--batch-size", args.batch_size, args.batch_size >= 1),
        ("--steps", args.steps, args.steps >= 1), ("--lr", args.lr, args.lr > 0), ("--ema", args.ema, 0 <= args.ema < 1),
        ("--eval-every", args.eval_every, args.eval_every >= 1),
        ("--max-minutes", args.max_minutes, args.max_minutes is None or args.max_minutes > 0),
    ])
    return args


def degradation_chain(args: argparse.Namespace) -> DegradationConfig:
    """The realistic chain with --chain's fields in place of the defaults (JSON lists become the config's tuples)."""
    return replace(REALISTIC_CHAIN, **{k: tuple(map(tuple, v)) if k == "downsampling" else tuple(v) if isinstance(v, list)
                                       else v for k, v in args.chain.items()})


# ---- data ----------------------------------------------------------------------------------------------------


class CropSampler:
    """Random HR crops of the training photographs, uniform over every crop position of those big enough."""

    def __init__(self, natural: NaturalData, size: int, seed: int) -> None:
        self.images = [image for image in natural.train_images if min(image.shape[1:]) >= size]
        if not self.images:
            raise ValueError(f"no training photograph is at least {size}x{size}: lower --crop")
        positions = np.array([(im.shape[1] - size + 1) * (im.shape[2] - size + 1) for im in self.images], dtype=np.float64)
        self.weights = positions / positions.sum()
        self.size, self.seed = size, seed
        self.skipped = len(natural.train_images) - len(self.images)

    def batch(self, count: int, step: int) -> torch.Tensor:
        """uint8 count x 3 x size x size, drawn from (seed, step) alone: a resumed run draws the same ones."""
        rng = np.random.default_rng([self.seed, step, 0x70686F])
        out = torch.empty(count, 3, self.size, self.size, dtype=torch.uint8)
        for i, pick in enumerate(rng.choice(len(self.images), size=count, p=self.weights).tolist()):
            image = self.images[pick]
            top = int(rng.integers(image.shape[1] - self.size + 1))
            left = int(rng.integers(image.shape[2] - self.size + 1))
            out[i] = image[:, top : top + self.size, left : left + self.size]
        return out


def validation_photos(root: Path, natural: NaturalData) -> list[torch.Tensor]:
    """The held-out photographs, whole (uint8 3 x H x W, cropped to multiples of 4), in `natural.val_files` order."""
    from trainer.natural import _decode

    photos = []
    for name in natural.val_files:
        image = _decode(Path(root) / name)
        photos.append(image[:, : image.shape[1] // SCALE * SCALE, : image.shape[2] // SCALE * SCALE].contiguous())
    return photos


# ---- training ------------------------------------------------------------------------------------------------


def learning_rate(step: int, args: argparse.Namespace, spent_s: float) -> float:
    """Linear warm-up, then cosine to zero; progress is the larger of steps done and training time spent."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = step / args.steps
    if args.max_minutes is not None:
        progress = max(progress, spent_s / (args.max_minutes * 60))
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, sampler: CropSampler, step: int,
                   args: argparse.Namespace, device: torch.device, amp: bool, chain: DegradationConfig | None) -> float:
    """One optimizer step at `lr` on a fresh batch of crops, their LR inputs through `chain` (None: bicubic only);
    returns the L1 loss."""
    model.train()
    targets = to_float(sampler.batch(args.batch_size, step)).to(device)
    targets = dihedral_augment(targets, torch.Generator(device).manual_seed(args.seed * 1_000_003 + step))
    if chain is not None:
        inputs = degrade_batch(targets, chain, seed=f"{args.seed}:{step}").to(device)
    else:
        inputs = bicubic_degrade(targets, SCALE)
    return optimizer_step(model, optimizer, lr, inputs, targets, nn.functional.l1_loss, amp).item()


@torch.inference_mode()
def evaluate(model: nn.Module, photos: list[torch.Tensor], device: torch.device, baseline: bool = False) -> dict:
    """Mean PSNR-Y (4-pixel border) of the model's 8-bit output on every photo, upscaled whole; with `baseline`,
    MATLAB-style bicubic of the same 8-bit inputs beside it."""
    model.eval()
    sums = {"model": 0.0, "bicubic": 0.0}
    for photo in photos:
        target = to_float(photo[None]).to(device)
        inputs = bicubic_degrade(target, SCALE)
        sums["model"] += psnr_y(to_8bit(model(inputs).float()), target, border=SCALE).item()
        if baseline:
            sums["bicubic"] += psnr_y(imresize_bicubic(inputs, SCALE, quantize=True), target, border=SCALE).item()
    result = {"model": {"psnr_y": sums["model"] / len(photos)}, "images": len(photos)}
    if baseline:
        result["bicubic"] = {"psnr_y": sums["bicubic"] / len(photos)}
    return result


class Steps(Task):
    """This recipe's part of the loop: a step on fresh crops, a progress line every --log-every steps, an evaluation
    every --eval-every steps and a checkpoint every --checkpoint-minutes, both also at the end: at --steps, or when
    --max-minutes of training time are spent (a stall does not count against it or move the cosine schedule on)."""

    event = "eval"

    def __init__(self, args: argparse.Namespace, sampler: CropSampler, photos: list[torch.Tensor], device: torch.device,
                 amp: bool, spent_s: float) -> None:
        self.args, self.sampler, self.photos, self.device, self.amp = args, sampler, photos, device, amp
        self.chain = degradation_chain(args) if args.degradation == "realistic" else None
        self.clock = TrainingClock(spent_s)
        self.lr, self.loss_sum, self.loss_count = 0.0, 0.0, 0  # the loss is the mean since the last evaluation

    def fits(self, training: Training) -> bool:
        budget_s = self.args.max_minutes * 60 if self.args.max_minutes is not None else math.inf
        return training.step < self.args.steps and self.clock.spent_s < budget_s

    def train(self, training: Training) -> None:
        args = self.args
        self.clock.start()
        self.lr = learning_rate(training.step, args, self.clock.spent_s)
        self.loss_sum += train_one_step(training.model, training.optimizer, self.lr, self.sampler, training.step, args,
                                        self.device, self.amp, self.chain)
        self.loss_count += 1
        training.step += 1
        training.ema.update(training.step)
        self.clock.stop(training.step)
        spent_s = self.clock.spent_s
        if training.step % args.log_every == 0:
            log.info("event=progress step=%d/%d loss=%.5f lr=%.3g train_minutes=%.1f s_per_step=%.2f", training.step, args.steps,
                     self.loss_sum / self.loss_count, self.lr, spent_s / 60,
                     spent_s / max(training.step - (training.history[0]["step"] if training.history else 0), 1))

    def evaluation_due(self, training: Training) -> bool:
        return training.step % self.args.eval_every == 0 or not self.fits(training)

    def evaluation(self, training: Training) -> dict:
        entry = {"step": training.step, "train_seconds": self.clock.spent_s, "loss": self.loss_sum / max(self.loss_count, 1),
                 "lr": self.lr, **flatten(evaluate(training.ema.averaged, self.photos, self.device))}
        self.loss_sum, self.loss_count = 0.0, 0
        return entry

    def checkpoint_due(self, training: Training) -> bool:
        return time.monotonic() - training.saved_at > self.args.checkpoint_minutes * 60 or not self.fits(training)

    def resume_point(self, training: Training) -> dict:
        return {"step": training.step, "train_seconds": self.clock.spent_s, "loss": None, "lr": self.lr}


def trained_seconds(history: list[dict]) -> float:
    """The training time spent, over resumed runs too: the last history entry's."""
    return history[-1]["train_seconds"] if history else 0.0


def load_initial_weights(model: nn.Module, spec: str, store: ModelStore) -> dict:
    """Load a published version's verified head, body and tail into `model`; what to record in the manifest."""
    name, state_dict, manifest = load_published("--init-from", spec, store)
    ours = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if k in ours and ours[k].shape == v.shape}
    dropped = sorted(k for k in state_dict if k not in kept)
    missing = sorted(k for k in ours if k not in kept)
    if missing:
        raise ValueError(f"--init-from {spec} ({json.dumps(manifest['architecture'])}) lacks {len(missing)} of this "
                         f"model's tensors (first: {missing[0]}): use the same width and depth")
    model.load_state_dict(kept)
    recorded = {"name": name, "version": manifest["version"], "weights_sha256": manifest["weights_sha256"],
                "architecture": manifest["architecture"], "store": store.url,
                "dropped_modules": sorted({k.split(".", 1)[0] for k in dropped})}
    log.info("event=init_from model=%s version=%d dropped=%s", name, manifest["version"], ",".join(recorded["dropped_modules"]) or "none")
    return recorded


def run_setup(args: argparse.Namespace, natural: NaturalData, amp: bool) -> dict:
    """What this run trains: written into checkpoints (a resume must match it) and into the manifest."""
    setup = {
        "architecture": {"name": "photo_residual", "params": args.arch_params},
        "degradation": DEGRADATION,
        "scale": SCALE,
        "recipe": {
            "recipe": "trainer.photo", "optimizer": "adam", "loss": "l1", "lr": args.lr, "lr_schedule": "cosine",
            "warmup_steps": args.warmup, "steps": args.steps, "max_minutes": args.max_minutes, "batch_size": args.batch_size,
            "lr_crop": args.crop, "hr_crop": args.crop * SCALE, "augment": "dihedral", "ema": args.ema, "seed": args.seed,
            "amp": "bf16" if amp else "none", "inputs": "8-bit (bicubic_degrade)", "init_from": args.init_from,
        },
        "dataset": {**natural.describe(), "val_crops": None, "validation": "the held-out photographs, whole"},
    }
    if args.degradation == "realistic":
        setup["degradation"] = REALISTIC
        setup["recipe"]["inputs"] = "8-bit (upgrader.degradations.degrade_batch, each crop's chain seeded by (seed, step, index))"
        setup["recipe"]["degradation_chain"] = degradation_chain(args).describe()
    return setup


def curve_png(history: list[dict], bicubic_psnr_y: float, title: str) -> bytes:
    """learning_curve.png: the training loss and the held-out PSNR-Y against training time, bicubic beside it."""
    from matplotlib.figure import Figure

    from trainer.report import _png

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, psnr_ax = fig.subplots(1, 2)
    trained = [h for h in history if h.get("loss") is not None]
    loss_ax.plot([h["step"] for h in trained], [h["loss"] for h in trained], "o-", markersize=3)
    loss_ax.set(xlabel="step", ylabel="L1 loss", title="training loss (mean since the last evaluation)")
    minutes = [h["train_seconds"] / 60 for h in history]
    psnr_ax.plot(minutes, [h["val_psnr_y"] for h in history], "o-", markersize=3, color="tab:orange", label="model (EMA)")
    psnr_ax.axhline(bicubic_psnr_y, color="gray", linestyle="--", label=f"bicubic {bicubic_psnr_y:.2f} dB")
    psnr_ax.set(xlabel="training minutes", ylabel="dB", title="held-out photos, PSNR-Y")
    psnr_ax.legend()
    for ax in (loss_ax, psnr_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _png(fig)


SAMPLE_JPEG_QUALITY = 75  # the JPEG row of a realistic model's samples.png


@torch.inference_mode()
def samples_png(model: nn.Module, photos: list[torch.Tensor], device: torch.device, title: str, count: int = 4,
                size: int = 128, jpeg_quality: int | None = None) -> bytes:
    """samples.png: a centre crop of a few held-out photos, 1:1: the LR input (enlarged, nearest), the original, the
    model, bicubic; with `jpeg_quality`, each photo again with its LR input saved as a JPEG of that quality."""
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    from trainer.report import _png
    from upgrader.degradations import jpeg

    model.eval()
    rows, labels = [], []
    chosen = photos[:: max(len(photos) // count, 1)][:count]
    size = min(size, *(min(photo.shape[1:]) for photo in chosen)) // SCALE * SCALE  # the same crop for every row
    for photo in chosen:
        top, left = (photo.shape[1] - size) // 2 // SCALE * SCALE, (photo.shape[2] - size) // 2 // SCALE * SCALE
        target = to_float(photo[None, :, top : top + size, left : left + size]).to(device)
        clean = bicubic_degrade(target, SCALE)
        kinds = [("clean", clean)] + ([(f"JPEG q{jpeg_quality}", jpeg(clean[0], jpeg_quality)[None])] if jpeg_quality else [])
        for label, inputs in kinds:
            rows += [nn.functional.interpolate(inputs, scale_factor=SCALE, mode="nearest"), target,
                     to_8bit(model(inputs).float()), imresize_bicubic(inputs, SCALE, quantize=True)]
            labels.append(label)
    grid = make_grid(torch.cat(rows).float().clamp(0, 1).cpu(), nrow=4, padding=2, pad_value=1.0)
    fig = Figure(figsize=(8, 2.1 * len(rows) // 4 + 0.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([2 + (size + 2) * c + size / 2 for c in range(4)], ["LR input", "original", "model", "bicubic"], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([2 + (size + 2) * r + size / 2 for r in range(len(labels))], labels, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def publish(training: Training, photos: list[torch.Tensor], args: argparse.Namespace, device: torch.device,
            checkpoint_dir: Path | None) -> int:
    """Evaluate the EMA weights on the held-out photographs (bicubic beside them) and publish a new version; with
    `checkpoint_dir`, mark its checkpoint published."""
    model, run, step, spent_s = training.ema.averaged, training.run, training.step, trained_seconds(training.history)
    history = [h for h in training.history if "val_psnr_y" in h]  # the evaluations, not the checkpoints' resume points
    metrics = evaluate(model, photos, device, baseline=True)
    gain = metrics["model"]["psnr_y"] - metrics["bicubic"]["psnr_y"]
    log.info("event=evaluated model=%s photos=%d psnr_y=%.4f bicubic_psnr_y=%.4f gain=%+.3f", args.publish_as,
             metrics["images"], metrics["model"]["psnr_y"], metrics["bicubic"]["psnr_y"], gain)
    manifest = {
        # The metrics under their own key, not the top-level "model"/"bicubic" of the 8x8 models: these are whole
        # photographs at x4, a different measurement, and the service ranks its default model by the top-level ones.
        **base_manifest(run, model, args, device, history=history, metrics={"heldout_photos_x4": metrics},
                        evaluation=EVALUATION, wall_time_s=spent_s),
        "input_shape": [3, None, None],  # any H x W
        "output_shape": [3, None, None],  # 4H x 4W
        "weights": "ema",
        "steps": step,
    }
    title = (f"{args.publish_as} (photo_residual {json.dumps(args.arch_params)}): {step} steps, {spent_s / 60:.0f} min\n"
             f"held-out photos x4: PSNR-Y {metrics['model']['psnr_y']:.2f} dB (bicubic {metrics['bicubic']['psnr_y']:.2f})")
    files = {"learning_curve.png": curve_png(history, metrics["bicubic"]["psnr_y"], title),
             "samples.png": samples_png(model, photos, device, title,
                                        jpeg_quality=SAMPLE_JPEG_QUALITY if run.get("degradation") == REALISTIC else None)}
    return publish_version(args.store, args.publish_as, model, manifest, files, checkpoint_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp = wants_bf16(args.amp, device)
    try:
        natural = load_natural_data(args.natural, cache_dir=args.cache_dir, progress=False)
        photos = validation_photos(args.natural, natural)
        run = run_setup(args, natural, amp)
        torch.manual_seed(args.seed)
        model = build_model("photo_residual", **args.arch_params).to(device)
        if args.init_from:
            run["recipe"]["init_from"] = load_initial_weights(model, args.init_from, ModelStore(args.init_store or args.store))
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        checkpoint_dir = args.checkpoint_dir / args.publish_as if args.checkpoint_dir else None
        training = Training(model, optimizer, EMA(model, args.ema), run, checkpoint_dir)
        resumed = False
        if checkpoint_dir is not None and (args.resume or args.publish_only):
            resumed = training.resume(RESUMABLE_CHANGES)
        if args.publish_only and not resumed:
            raise ValueError(f"--publish-only: no checkpoint in {checkpoint_dir}")
        sampler = CropSampler(natural, args.crop * SCALE, args.seed)
        log.info("event=start params=%d device=%s amp=%s threads=%d train_photos=%d (skipped %d under %dpx) val_photos=%d step=%d",
                 parameter_count(model), device, amp, torch.get_num_threads(), len(sampler.images), sampler.skipped,
                 sampler.size, len(photos), training.step)

        if not args.publish_only:
            if not training.history:  # where it starts: the initial weights' held-out score
                training.history.append({"step": training.step, "train_seconds": 0.0, "loss": None, "lr": 0.0,
                                         **flatten(evaluate(training.ema.averaged, photos, device, baseline=True))})
                log.info("event=eval %s", logfmt(training.history[-1]))
            fit(training, Steps(args, sampler, photos, device, amp, spent_s=trained_seconds(training.history)))
        if args.no_publish:
            return 0
        if args.publish_only:  # a snapshot that leaves the checkpoint alone: a run may still be training (and writing) there
            publish(training, photos, args, device, checkpoint_dir=None)
        else:
            publish_once(training, lambda: publish(training, photos, args, device, checkpoint_dir))
    except (FileNotFoundError, ValueError, StoreError) as exc:
        log.error("event=failed error=%s", exc)
        return 1
    return 0


def flatten(metrics: dict) -> dict:
    flat = {"val_psnr_y": metrics["model"]["psnr_y"]}
    if "bicubic" in metrics:
        flat["val_bicubic_psnr_y"] = metrics["bicubic"]["psnr_y"]
    return flat


if __name__ == "__main__":
    sys.exit(main())
