"""Train upgraders (8x8 -> 32x32) and publish each one to the model store.

    python -m trainer --models fc,conv,resnet18 --data ../shared/datasets/cifar10-jpeg --epochs 20
    torchrun --standalone --nproc_per_node 2 -m trainer --models conv --data DIR   # DDP: one process per GPU (gloo on CPU)

For every model in --models: build it, train it with the recipe below (one log
line per epoch, a progress bar while an epoch runs), evaluate it against bicubic
on the validation split, draw loss_curve.png and samples.png, and publish a new
version with its manifest. The defaults are the reference recipe (Adam, lr 1e-3,
batch 128, MSE, 20 epochs); docs/training.md gives the shipped models' recipes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model_store import ModelStore, StoreError
from trainer import distributed
from trainer.data import ImageData, batches, load_image_data, place_on_device
from trainer.engine import (add_checkpoint_arguments, add_device_arguments, add_store_arguments, base_manifest,
                            check_common_args, json_object, load_published, logfmt, native_bf16,
                            optimizer_step, publish_version)
from trainer.loop import Task, Training, fit, publish_once
from trainer.natural import NaturalData, epoch_images, load_natural_data
from trainer.recipe import EMA, LOSSES, LR_SCHEDULES, dihedral_augment, learning_rate
from trainer.report import loss_curve_png, samples_png
from upgrader.architectures import ARCHITECTURES, INPUT_SHAPE, OUTPUT_SHAPE, build_model, parameter_count
from upgrader.cpus import native_bf16_cpu
from upgrader.ensemble import self_ensemble
from upgrader.imaging import bicubic_upscale, downsample, mse_per_image, psnr_per_image, ssim_per_image, to_8bit, to_float

log = logging.getLogger("trainer")

EVAL_BATCH_SIZE = 1000
# How `evaluate` measures, written into every manifest. Manifests without it (before 2026-11-27) were measured
# on exact float inputs and outputs, which scored photo tiles differently.
EVALUATION = "as served: 8-bit 8x8 inputs, 8-bit 32x32 outputs"
SAMPLE_IMAGES = 8
# Recipe entries a resumed run may change; any other difference means a different experiment.
RESUMABLE_CHANGES = {"epochs"}


def model_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return names


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_argument_group("data and store")
    where.add_argument("--models", type=model_names, default=["fc", "conv", "resnet18"],
                       help=f"comma-separated architectures to train, one after the other (known: {', '.join(sorted(ARCHITECTURES))})")
    where.add_argument("--data", type=Path, default=os.environ.get("UPGRADER_DATA"),
                       help="ImageFolder tree with train/ and test/, or a torchvision CIFAR-10 directory (default: $UPGRADER_DATA)")
    where.add_argument("--natural", type=Path, default=os.environ.get("UPGRADER_NATURAL_DATA") or None, metavar="DIR",
                       help="natural photographs (sr-natural: bsd200/, yang91/): their held-out part is a second validation set "
                            "reported next to --data's; with --natural-share they are also trained on (default: $UPGRADER_NATURAL_DATA)")
    where.add_argument("--natural-share", type=float, default=0.0, metavar="F",
                       help="share of each epoch's training images that are random 32x32 crops of the --natural photographs; the "
                            "rest come from --data (an epoch is --epoch-size images); 1 = natural crops alone, 0 = none")
    where.add_argument("--epoch-size", type=int, default=None, metavar="N",
                       help="training images per epoch (default: --data's training-set size); each epoch draws a fresh seeded "
                            "subset of --data (and fresh natural crops), so shorter epochs only make evaluations and checkpoints more frequent")
    where.add_argument("--epoch-val", type=int, default=None, metavar="N",
                       help="evaluate each epoch's history on an evenly spread N of the validation images (and the same share of "
                            "the natural ones); the published metrics always use all of them (default: all)")
    where.add_argument("--download", action="store_true", help="fetch CIFAR-10 through torchvision into --data if it is not there")
    add_store_arguments(where, cache_what="decoded-tensor")
    where.add_argument("--limit-train", type=int, default=None, metavar="N", help="train on a fixed, seeded random subset of N images")
    where.add_argument("--limit-val", type=int, default=None, metavar="N", help="validate on a fixed, seeded random subset of N images")
    where.add_argument("--publish-as", default=None, metavar="NAME",
                       help="store name to publish under (default: the architecture name; only with a single model)")

    recipe = p.add_argument_group("recipe (defaults: the reference recipe)")
    recipe.add_argument("--epochs", type=int, default=20, help="passes over the training set, reshuffled every epoch")
    recipe.add_argument("--batch-size", type=int, default=128, help="images per optimizer step per process")
    recipe.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the peak, with a schedule)")
    recipe.add_argument("--loss", choices=sorted(LOSSES), default="mse", help="training loss")
    recipe.add_argument("--lr-schedule", choices=sorted(LR_SCHEDULES), default="constant",
                        help="learning rate over the run: constant, cosine decay to 0, or one-cycle (warm-up then anneal)")
    recipe.add_argument("--schedule-over", choices=["epochs", "time"], default="epochs",
                        help="what the LR schedule spans: --epochs (deterministic), or --max-minutes of training time "
                             "(progress = time spent / budget, so a run on a busy machine still ends annealed; --epochs is then a cap)")
    recipe.add_argument("--augment", choices=["none", "dihedral"], default="none",
                        help="dihedral: each target randomly flipped/rotated (8 ways) before its input is made")
    recipe.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                        help="keep an exponential moving average of the weights (e.g. 0.999) and publish it; 0 = off")
    recipe.add_argument("--quantize-inputs", action="store_true",
                        help="round each 8x8 input to 8-bit levels, as the PNG a client sends to the service is (default: exact floats)")
    recipe.add_argument("--arch-params", type=json_object, default={}, metavar="JSON",
                        help="keyword arguments for the architecture (every model in --models), e.g. '{\"width\": 64, \"depth\": 8}'")
    recipe.add_argument("--init-from", default=None, metavar="NAME[:VERSION]",
                        help="start from the weights of a published version (fine-tuning) instead of a random init; the same "
                             "architecture, and the same --arch-params or ones that only add identity-initialised modules "
                             "(e.g. global_attention: a growth, checked on a batch). Recorded in the manifest (recipe.init_from)")
    recipe.add_argument("--seed", type=int, default=0, help="seeds the initial weights, the batch order and augmentation")

    run = p.add_argument_group("how it runs")
    add_device_arguments(run, amp_default="none",
                         amp_help="bf16 autocast of the forward pass, on CUDA and on the CPU (there 1.55-1.65x faster a step for "
                                  "subpixel_residual where the CPU computes bf16 natively, AVX512-BF16 or AMX, at the same PSNR; "
                                  "slower than float32 where it does not, said at start). auto: bf16 where the device has it "
                                  "natively. The manifest records what ran")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long GPU runs)")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="training-time budget per model, over resumed runs too: no epoch is started that would end "
                          "past it (judged by the last epoch's time; the first epoch always runs)")
    add_checkpoint_arguments(run, when="after every epoch",
                             resume_help="continue each model from its last finished epoch in --checkpoint-dir (fresh if there is none)")
    run.add_argument("--no-ensemble-metrics", action="store_true",
                     help="do not measure the 8-view self-ensemble when publishing (it costs 8 forward passes per validation image)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required (or set UPGRADER_DATA)")
    if args.schedule_over == "time" and args.max_minutes is None:
        parser.error("--schedule-over time needs --max-minutes (the time the schedule spans)")
    if args.natural_share > 0 and args.natural is None:
        parser.error("--natural-share needs --natural DIR (or UPGRADER_NATURAL_DATA)")
    if args.publish_as is not None and len(args.models) != 1:
        parser.error("--publish-as names one model; train one model per run with it")
    check_common_args(parser, args, [
        ("--epochs", args.epochs, args.epochs >= 1),
        ("--batch-size", args.batch_size, args.batch_size >= 1),
        ("--lr", args.lr, args.lr > 0),
        ("--ema", args.ema, 0 <= args.ema < 1),
        ("--natural-share", args.natural_share, 0 <= args.natural_share <= 1),
        ("--epoch-size", args.epoch_size, args.epoch_size is None or args.epoch_size >= 1),
        ("--epoch-val", args.epoch_val, args.epoch_val is None or args.epoch_val >= 1),
        ("--max-minutes", args.max_minutes, args.max_minutes is None or args.max_minutes > 0),
    ])
    return args


def steps_per_epoch(train_size: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch on every rank (`batches` gives each rank train_size // world_size images)."""
    return math.ceil(train_size // world_size / batch_size)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    epoch: int,
    step: int,
    total_steps: int,
    args: argparse.Namespace,
    runtime: distributed.Runtime,
    ema: EMA | None,
    name: str,
    spent_s: float = 0.0,
) -> tuple[float, int]:
    """One pass over this rank's shard of the (reshuffled) training set; returns the mean loss over all ranks and the step.

    `spent_s`: training time of the earlier epochs, for `--schedule-over time`.
    """
    model.train()
    loss_fn = LOSSES[args.loss]
    amp = args.amp == "bf16"
    # Seeded per epoch and rank (not from the global RNG) so a resumed run augments exactly like an uninterrupted one.
    augment_rng = torch.Generator(runtime.device).manual_seed(args.seed * 1_000_003 + epoch * 1_009 + runtime.rank)
    loss_sum = torch.zeros((), device=runtime.device)
    seen = 0
    order = batches(images, args.batch_size, runtime.device, shuffle=True, epoch=epoch, seed=args.seed,
                    rank=runtime.rank, world_size=runtime.world_size)
    bar = tqdm(order, total=steps_per_epoch(len(images), args.batch_size, runtime.world_size), unit="batch", leave=False,
               desc=f"{name} epoch {epoch}/{args.epochs}", disable=not runtime.is_main or args.no_progress)
    started = time.perf_counter()
    budget_s = args.max_minutes * 60 if args.schedule_over == "time" else None
    for targets in bar:
        at = step
        if budget_s is not None:  # the schedule's position is the larger of steps done and time spent
            at = max(step, int(total_steps * min((spent_s + time.perf_counter() - started) / budget_s, 1.0)))
        lr = learning_rate(at, total_steps, base_lr=args.lr, schedule=args.lr_schedule)
        if args.augment == "dihedral":
            targets = dihedral_augment(targets, augment_rng)
        inputs = downsample(targets)
        if args.quantize_inputs:
            inputs = to_8bit(inputs)
        loss = optimizer_step(model, optimizer, lr, inputs, targets, loss_fn, amp)
        step += 1
        if ema is not None:
            ema.update(step)
        loss_sum += loss * len(targets)  # stays on the device: no sync per step
        seen += len(targets)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}", lr=f"{lr:.2e}")
    totals = runtime.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=runtime.device)]))
    return (totals[0] / totals[1]).item(), step


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, device: torch.device, *, loss_name: str, baseline: bool = False,
             ensemble: bool = False) -> dict:
    """Mean loss, MSE, PSNR and SSIM over the images; with `baseline`, the same for bicubic of the same 8x8 inputs;
    with `ensemble`, the same for the model's test-time self-ensemble (8 dihedral views averaged).

    Measured as served (EVALUATION): each 8x8 input rounded to 8 bits, as the PNG a client sends holds it, and
    each output rounded to 8 bits, as the PNG the service answers with holds it; in float32 even after bf16
    training. These are the numbers `POST /upscale` reports for the same images sent with references.
    The loss is that of the unrounded outputs (the training loss's view).
    """
    model.eval()
    loss_fn = LOSSES[loss_name]
    who = ["model"] + ["bicubic"] * baseline + ["self_ensemble"] * ensemble
    sums = {name: {"mse": 0.0, "psnr": 0.0, "ssim": 0.0} for name in who}
    loss_sum = 0.0
    for targets in batches(images, EVAL_BATCH_SIZE, device, shuffle=False):
        inputs = to_8bit(downsample(targets))
        outputs = {"model": model(inputs).float()}
        if baseline:
            outputs["bicubic"] = bicubic_upscale(inputs)
        if ensemble:
            outputs["self_ensemble"] = self_ensemble(model, inputs).float()
        loss_sum += loss_fn(outputs["model"], targets).item() * len(targets)
        for name, output in outputs.items():
            predicted = to_8bit(output)
            sums[name]["mse"] += mse_per_image(predicted, targets).sum().item()
            sums[name]["psnr"] += psnr_per_image(predicted, targets).sum().item()
            sums[name]["ssim"] += ssim_per_image(predicted, targets).sum().item()
    n = len(images)
    metrics = {name: {metric: total / n for metric, total in by_metric.items()} for name, by_metric in sums.items()}
    return {**metrics, "loss": loss_sum / n, "images": n}


@torch.inference_mode()
def draw_samples(model: nn.Module, val: torch.Tensor, device: torch.device, title: str) -> bytes:
    """samples.png from validation images spread over the split (a class-sorted split gives one per class)."""
    model.eval()
    index = torch.linspace(0, len(val) - 1, min(SAMPLE_IMAGES, len(val))).long()
    targets = to_float(val[index]).to(device)
    inputs = downsample(targets)
    return samples_png(inputs, targets, model(inputs).float(), bicubic_upscale(inputs), title=title)


def recipe_of(args: argparse.Namespace, runtime: distributed.Runtime) -> dict:
    return {
        "optimizer": "adam",
        "lr": args.lr,
        "batch_size": args.batch_size,
        "world_size": runtime.world_size,
        "global_batch_size": args.batch_size * runtime.world_size,
        "loss": args.loss,
        "epochs": args.epochs,
        "lr_schedule": args.lr_schedule,
        "schedule_over": args.schedule_over,
        "augment": args.augment,
        "ema": args.ema,
        "amp": args.amp,
        "seed": args.seed,
        "shuffle": "once per epoch",
        # Only when on, so checkpoints written before the flag existed still resume (their recipe lacks it).
        **({"quantize_inputs": True} if args.quantize_inputs else {}),
    }


def dataset_of(data: ImageData, natural: NaturalData | None = None, natural_share: float = 0.0) -> dict:
    """The data lineage: --data, and --natural with its fingerprint, held-out files and share of each epoch."""
    dataset = {"name": data.name, "fingerprint": data.fingerprint, "train_size": len(data.train), "val_size": len(data.val)}
    if natural is not None:
        dataset["natural"] = natural.describe()
        dataset["mix"] = {data.name: 1.0 - natural_share, natural.name: natural_share}
    return dataset


def load_initial_weights(model: nn.Module, init_from: str, store_location: str | None, architecture: dict) -> dict:
    """Load a published version's verified weights into `model` (--init-from); what to record in the recipe."""
    name, state_dict, manifest = load_published("--init-from", init_from, ModelStore(store_location))
    source = {"name": manifest["architecture"]["name"], "params": manifest["architecture"].get("params", {})}
    device = next(model.parameters()).device
    state_dict = {k: v.to(device) for k, v in state_dict.items()}
    recorded = {"name": name, "version": manifest["version"], "weights_sha256": manifest["weights_sha256"],
                "wall_time_s": manifest.get("wall_time_s"), "psnr": manifest["metrics"]["model"]["psnr"]}
    if source == architecture:
        model.load_state_dict(state_dict)
    else:
        recorded["grown"] = grow(model, state_dict, source, architecture, init_from)
    log.info("event=init_from model=%s version=%d psnr=%.4f grown=%s", name, manifest["version"],
             manifest["metrics"]["model"]["psnr"], ",".join(recorded.get("grown", {}).get("new_modules", [])) or "no")
    return recorded


def grow(model: nn.Module, state_dict: dict, source: dict, architecture: dict, init_from: str) -> dict:
    """Start a larger model from a published smaller one (--init-from with other --arch-params); `state_dict`
    is the published one, already on the model's device.

    Allowed only when it is a pure growth: every published tensor lands on a parameter of the same name and
    shape, and the new modules start as the identity (as `global_attention` blocks do), so the grown model's
    outputs equal the published model's on a fixed batch. Anything else would throw the published training
    away while claiming to build on it.
    """
    refuse = f"--init-from {init_from} is {json.dumps(source)}; this run trains {json.dumps(architecture)}"
    if source["name"] != architecture["name"]:
        raise ValueError(refuse)
    ours = model.state_dict()
    stray = sorted(k for k, v in state_dict.items() if k not in ours or ours[k].shape != v.shape)
    if stray:
        raise ValueError(f"{refuse}, and {len(stray)} of its tensors have no place here (first: {stray[0]})")
    missing = model.load_state_dict(state_dict, strict=False).missing_keys
    device = next(model.parameters()).device
    published = build_model(source["name"], **source["params"]).to(device)
    published.load_state_dict(state_dict)
    inputs = torch.rand(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval(), published.eval()
    with torch.no_grad():
        gap = (model(inputs) - published(inputs)).abs().max().item()
    model.train(was_training)
    if gap > 1e-5:
        raise ValueError(f"{refuse}, and the new modules are not the identity at the start "
                         f"(outputs differ by up to {gap:.3g}): that is not a growth")
    return {"from_params": source["params"], "new_modules": sorted({k.rsplit(".", 2)[0] for k in missing})}


def without_retired_phase(run: dict) -> dict:
    """A checkpoint's setup without the retired coarse-to-fine phase where it records it as off: the same experiment."""
    recipe = dict(run["recipe"])
    if not recipe.get("coarse_to_fine"):
        recipe.pop("coarse_to_fine", None), recipe.pop("fine_lr_scale", None)
    return {**run, "recipe": recipe}


def next_epoch_fits(history: list[dict], max_minutes: float | None) -> bool:
    """Whether one more epoch, as long as the last one, ends within the training-time budget.

    The budget counts the training time of earlier (killed and resumed) runs too.
    """
    if max_minutes is None or not history:
        return True
    spent = sum(h["seconds"] for h in history)
    return spent + history[-1]["seconds"] <= max_minutes * 60


def evenly_spread(images: torch.Tensor, count: int) -> torch.Tensor:
    """`count` of the images, evenly spread over them."""
    return images[torch.linspace(0, len(images) - 1, count).long().to(images.device)]


class Epochs(Task):
    """This recipe's part of the loop: an epoch over this rank's shard of a fresh draw of --epoch-size images, with an
    evaluation and a checkpoint (on rank 0) after every one. No epoch starts past --epochs, or that rank 0 judges to
    end past --max-minutes."""

    event = "epoch"

    def __init__(self, training: Training, train: torch.Tensor, natural: NaturalData | None, val: torch.Tensor | None,
                 natural_val: torch.Tensor | None, args: argparse.Namespace, runtime: distributed.Runtime, name: str) -> None:
        self.train_images, self.natural, self.args, self.runtime, self.name = train, natural, args, runtime, name
        self.epoch = training.saves  # the last finished one: a checkpoint follows every epoch
        self.trained: nn.Module = training.model  # what the steps run: the model under DDP and torch.compile
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.trained = DistributedDataParallel(training.model, device_ids=device_ids)
        if args.compile:
            self.trained = torch.compile(self.trained)
        self.epoch_size = args.epoch_size or len(train)
        self.total_steps = args.epochs * steps_per_epoch(self.epoch_size, args.batch_size, runtime.world_size)
        self.val, self.natural_val = val, natural_val  # what each epoch's history is measured on (--epoch-val)
        if args.epoch_val is not None and runtime.is_main and args.epoch_val < len(val):
            self.val = evenly_spread(val, args.epoch_val)
            if natural_val is not None:
                self.natural_val = evenly_spread(natural_val, max(1, round(len(natural_val) * args.epoch_val / len(val))))

    def fits(self, training: Training) -> bool:
        if self.epoch >= self.args.epochs:
            return False
        if not self.runtime.rank0_decides(next_epoch_fits(training.history, self.args.max_minutes)):
            log.info("event=budget model=%s max_minutes=%s stopped_after_epoch=%d", self.name, self.args.max_minutes, self.epoch)
            return False
        return True

    def train(self, training: Training) -> None:
        self.epoch += 1
        self.started = time.perf_counter()
        images = epoch_images(self.train_images, self.natural, self.args.natural_share, epoch=self.epoch, seed=self.args.seed,
                              size=self.epoch_size)
        self.train_loss, training.step = train_one_epoch(self.trained, training.optimizer, images, self.epoch, training.step,
                                                         self.total_steps, self.args, self.runtime, training.ema, self.name,
                                                         spent_s=sum(h["seconds"] for h in training.history))
        self.train_seconds = time.perf_counter() - self.started  # the loss is a host float by now: the GPU's work is done

    def evaluation(self, training: Training) -> dict:
        model, device, loss_name = training.evaluated, self.runtime.device, self.args.loss
        val_metrics = evaluate(model, self.val, device, loss_name=loss_name)
        natural_psnr = {}
        if self.natural_val is not None:
            natural_psnr["val_natural_psnr"] = evaluate(model, self.natural_val, device, loss_name=loss_name)["model"]["psnr"]
        return {
            "epoch": self.epoch, "train_loss": self.train_loss, "val_loss": val_metrics["loss"],
            "val_psnr": val_metrics["model"]["psnr"], **natural_psnr, "lr": training.optimizer.param_groups[0]["lr"],
            "train_seconds": self.train_seconds, "seconds": time.perf_counter() - self.started,
        }


def train_and_publish(arch: str, data: ImageData, train: torch.Tensor, val: torch.Tensor | None,
                      args: argparse.Namespace, runtime: distributed.Runtime, natural: NaturalData | None = None,
                      natural_val: torch.Tensor | None = None) -> int | None:
    """Train one architecture; on rank 0 evaluate and publish it. Returns the published version (rank 0)."""
    name = args.publish_as or arch
    torch.manual_seed(args.seed)  # same initial weights on every rank, whatever the order of --models
    try:
        model = build_model(arch, **args.arch_params).to(runtime.device)
    except TypeError as exc:
        raise ValueError(f"--arch-params {json.dumps(args.arch_params)} do not fit architecture {arch!r}: {exc}") from None
    # What is being trained: the manifest entries known before training, and what a resume must match.
    run = {"architecture": {"name": arch, "params": args.arch_params}, "recipe": recipe_of(args, runtime), "dataset": dataset_of(data, natural, args.natural_share)}
    if args.init_from:
        run["recipe"]["init_from"] = load_initial_weights(model, args.init_from, args.store, run["architecture"])
    # On CUDA one fused kernel updates every parameter (the multi-tensor default launches several per step);
    # the CPU keeps the default, which the resume and checkpoint tests pin down.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=runtime.device.type == "cuda")
    ema = EMA(model, args.ema) if args.ema > 0 else None  # averages from the initial weights, published ones included
    checkpoint_dir = args.checkpoint_dir / name if args.checkpoint_dir else None
    training = Training(model, optimizer, ema, run, checkpoint_dir, log_fields={"model": name})
    if args.resume and checkpoint_dir is not None:
        training.resume(RESUMABLE_CHANGES, saved_setup=without_retired_phase)

    epochs = Epochs(training, train, natural, val, natural_val, args, runtime, name)
    log.info("event=start model=%s params=%d train=%d val=%d device=%s world_size=%d backend=%s first_epoch=%d", name, parameter_count(model),
             len(data.train), len(data.val), runtime.device, runtime.world_size, runtime.backend, epochs.epoch + 1)
    fit(training, epochs, is_main=runtime.is_main)
    if not runtime.is_main:
        return None
    return publish_once(training, lambda: publish(name, training, data, val, args, runtime, natural_val))


def publish(name: str, training: Training, data: ImageData, val: torch.Tensor, args: argparse.Namespace,
            runtime: distributed.Runtime, natural_val: torch.Tensor | None = None) -> int:
    """Evaluate the trained weights against bicubic (on --data's validation split, and on the natural one if any), draw
    the pictures and publish a new version of `name`."""
    model, history, ensemble = training.evaluated, training.history, not args.no_ensemble_metrics
    metrics = evaluate(model, val, runtime.device, loss_name=args.loss, baseline=True, ensemble=ensemble)
    metrics.pop("loss")
    if natural_val is not None:
        metrics["natural"] = evaluate(model, natural_val, runtime.device, loss_name=args.loss, baseline=True, ensemble=ensemble)
        metrics["natural"].pop("loss")
    for split, measured in [("val", metrics), ("natural_val", metrics.get("natural"))]:
        if measured is None:
            continue
        gain = measured["model"]["psnr"] - measured["bicubic"]["psnr"]
        log.info("event=evaluated model=%s split=%s images=%d %s %s psnr_vs_bicubic=%+.3f verdict=%s", name, split,
                 measured["images"], logfmt(measured["model"]), logfmt(measured["bicubic"], prefix="bicubic_"), gain,
                 "beats_bicubic" if gain > 0 else "loses_to_bicubic")
    arch = training.run["architecture"]["name"]
    title = (f"{name}{f' ({arch})' if name != arch else ''}: {len(history)} epochs\n"
             f"PSNR {metrics['model']['psnr']:.2f} dB (bicubic {metrics['bicubic']['psnr']:.2f})")
    files = {
        "loss_curve.png": loss_curve_png(history, title=title, loss_name=args.loss, bicubic_psnr=metrics["bicubic"]["psnr"]),
        "samples.png": draw_samples(model, data.val, runtime.device, title),
    }
    manifest = {
        **base_manifest(training.run, model, args, runtime.device, history=history, metrics=metrics, evaluation=EVALUATION,
                        wall_time_s=sum(h["seconds"] for h in history)),
        "input_shape": list(INPUT_SHAPE),
        "output_shape": list(OUTPUT_SHAPE),
        "weights": "ema" if args.ema > 0 else "last",  # which weights were evaluated and published
        "device_name": distributed.describe(runtime.device),
        "epochs_completed": history[-1]["epoch"] if history else 0,
    }
    return publish_version(args.store, name, model, manifest, files, training.checkpoint_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime = distributed.setup(args.device)
    logging.basicConfig(level=logging.INFO if runtime.is_main else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s rank={runtime.rank} %(message)s")
    if args.schedule_over == "time" and runtime.world_size > 1:
        # Each rank's clock would set its own learning rate and the replicas would drift apart.
        log.error("event=failed error='--schedule-over time is for single-process runs, not world_size=%d'", runtime.world_size)
        distributed.teardown()
        return 2
    if args.amp == "auto":
        args.amp = "bf16" if native_bf16(runtime.device) else "none"
    if args.amp == "bf16" and runtime.device.type == "cpu" and not native_bf16_cpu():
        log.warning("event=amp_slow reason='this CPU has no native bf16 (AVX512-BF16 or AMX): --amp bf16 is emulated, "
                    "slower than float32'")
    try:
        data = load_image_data(args.data, download=args.download, cache_dir=args.cache_dir, limit_train=args.limit_train,
                               limit_val=args.limit_val, seed=args.seed, progress=runtime.is_main and not args.no_progress)
        natural = None
        if args.natural is not None:
            natural = load_natural_data(args.natural, cache_dir=args.cache_dir, progress=runtime.is_main and not args.no_progress)
        train = place_on_device(data.train, runtime.device)
        val = place_on_device(data.val, runtime.device) if runtime.is_main else None
        natural_val = place_on_device(natural.val, runtime.device) if natural is not None and runtime.is_main else None
        for arch in args.models:
            train_and_publish(arch, data, train, val, args, runtime, natural, natural_val)
        # Leave together: a rank that exits while rank 0 still evaluates and publishes closes its
        # gloo connections under rank 0, which can then fail with "Connection closed by peer".
        runtime.barrier()
    except (FileNotFoundError, ValueError, StoreError) as exc:
        log.error("event=failed error=%s", exc)
        return 1
    finally:
        distributed.teardown()
    return 0
