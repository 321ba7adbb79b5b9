"""The ablation tables: each training idea switched against the default recipe of subpixel_residual.

    .venv/bin/python bench/ablation.py                         # 8 trainings of 3 minutes: ~35 minutes on 2 cores
    .venv/bin/python bench/ablation.py --minutes-per-row 0.5 --limit-train 2000 --limit-val 500   # a quick look
    .venv/bin/python bench/ablation.py --speed-only                # inference images/s vs resnet18 (~1 minute)
    .venv/bin/python bench/ablation.py --suite model-data --natural ../shared/datasets/sr-natural   # data mix and architecture rows

Suite `recipe` (the default) is described first, suite `model-data` after it.

Every row trains with the real trainer (`trainer.train.main`, in this process) on the same seeded
subsets (--limit-train / --limit-val), with the same seed (so the same initial weights and batch
order) and the same number of epochs: as many as the default recipe fits in --minutes-per-row,
measured on this machine at the start. Every row publishes into one store name (--store, default
a temporary directory), so the rows are versions of one model.

    bicubic            the baseline: no training
    default            DEFAULT_RECIPE
    <flag>=<value>     the default with one idea changed (every alternative of every flag in IDEAS)
    + self-ensemble    the default row's weights, evaluated with the 8-view test-time ensemble

Suite `model-data`: the rows of MODEL_DATA_ROWS (natural-data share, then body width/depth, channel
attention and re-parameterised convs), each a real training run with DEFAULT_RECIPE (l1, cosine,
dihedral, EMA 0.999) for the same --epochs of the same --epoch-size images, same seed. Every row is
evaluated on the CIFAR-10 validation subset and on the fixed natural validation set (trainer/natural.py),
each against bicubic; inference speed is measured for every architecture in the same interleaved rounds.

Columns: validation PSNR and SSIM, gain over bicubic, difference to the default row, epochs, training
minutes (wall), and inference speed at batch 64 in this process
(images/s, and images per CPU-second of this process, which other jobs on the cores disturb less;
medians of interleaved rounds). The speed of resnet18 is measured in the same run as a reference;
`--speed-only` prints just the speeds. A row's training is capped at twice
--minutes-per-row (then it ran fewer epochs than the others, which the epochs column shows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from model_store import ModelStore
from trainer.recipe import LOSSES
from trainer.train import main as train_main
from upgrader.architectures import INPUT_SHAPE, build_model
from upgrader.ensemble import self_ensemble
from upgrader.imaging import bicubic_upscale, downsample

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.environ.get("UPGRADER_DATA") or str(PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg")
ARCHITECTURE = "subpixel_residual"
STORE_NAME = "ablation"
# The recipe chosen for subpixel_residual (the trainer's own defaults are the reference recipe).
DEFAULT_RECIPE = {
    "--loss": "l1",
    "--lr-schedule": "cosine",
    "--augment": "dihedral",
    "--ema": "0.999",
}
# Every value each idea can take; a row per value the default does not use.
IDEAS = {
    "--loss": sorted(LOSSES),
    "--lr-schedule": ["constant", "cosine", "onecycle"],
    "--augment": ["none", "dihedral"],
    "--ema": ["0", "0.999"],
}
OFF = {"0": "off", "0.999": "on (0.999)"}
SPEED_BATCH = 64
# (row, --arch-params, --natural-share). The first row is today's model on today's data.
MODEL_DATA_ROWS = [
    ("48x6, CIFAR-10 only (today)", {}, 0.0),
    ("48x6, natural share 0.5", {}, 0.5),
    ("48x6, natural alone", {}, 1.0),
    ("64x8, natural share 0.5", {"width": 64, "depth": 8}, 0.5),
    ("64x8 + channel attention, share 0.5", {"width": 64, "depth": 8, "attention": 16}, 0.5),
    ("64x8 + re-parameterised convs (3x3+1x1), share 0.5", {"width": 64, "depth": 8, "rep": True}, 0.5),
]


@dataclass
class Row:
    name: str
    psnr: float
    ssim: float
    gain_db: float  # over bicubic on the same images
    epochs: int | None
    train_minutes: float | None
    images_per_s: float
    images_per_cpu_s: float
    version: int | None = None


def inference_speed(forward: Callable[[torch.Tensor], torch.Tensor], batch: int, seconds: float) -> tuple[float, float]:
    """Images/s and images per CPU-second of this process for `forward` on batches of `batch` 8x8 inputs."""
    inputs = downsample(torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert inputs.shape[1:] == INPUT_SHAPE
    with torch.inference_mode():
        forward(inputs)  # warm-up: first-call allocations and kernel choice
        images, wall, cpu = 0, time.perf_counter(), time.process_time()
        while images == 0 or time.perf_counter() - wall < seconds:
            forward(inputs)
            images += batch
        return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def inference_speeds(forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]], batch: int, seconds: float,
                     rounds: int) -> dict[str, tuple[float, float]]:
    """`inference_speed` of each forward, interleaved over `rounds` rounds (so other jobs on the cores hit all
    of them alike), median of each column."""
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in forwards}
    for _ in range(rounds):
        for name, forward in forwards.items():
            measured[name].append(inference_speed(forward, batch, seconds))
    return {name: (statistics.median(s for s, _ in runs), statistics.median(c for _, c in runs)) for name, runs in measured.items()}


def speed_forwards(model: torch.nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The forwards whose speed the table reports: the model, its self-ensemble and the two references."""
    return {
        "model": model,
        "self-ensemble": lambda x: self_ensemble(model, x),
        "bicubic": bicubic_upscale,
        "resnet18": build_model("resnet18").eval(),
    }


def print_speed_only(args: argparse.Namespace, arch_params: dict, console: Console) -> None:
    model = build_model(ARCHITECTURE, **arch_params).eval()  # the weights do not change the speed
    forwards = speed_forwards(model)
    for candidate in json.loads(args.speed_candidates):  # measured in the same interleaved rounds
        forwards[f"{ARCHITECTURE} {candidate}"] = build_model(ARCHITECTURE, **candidate).eval()
    speeds = inference_speeds(forwards, SPEED_BATCH, args.speed_seconds, args.speed_rounds)
    table = Table(title=f"in-process inference at batch {SPEED_BATCH}, torch.inference_mode, {torch.get_num_threads()} threads, "
                        f"median of {args.speed_rounds} interleaved rounds of {args.speed_seconds:g} s")
    for column in ("forward", "images/s", "images/CPU-s", "vs model (images/s)", "vs model (images/CPU-s)", "vs resnet18"):
        table.add_column(column, justify="left" if column == "forward" else "right")
    base_s, base_cpu_s = speeds["model"]
    for name, (per_s, per_cpu_s) in speeds.items():
        label = f"model: {ARCHITECTURE} {arch_params or '(defaults)'}" if name == "model" else name
        table.add_row(label, f"{per_s:,.0f}", f"{per_cpu_s:,.0f}", f"{per_s / base_s:.2f}x", f"{per_cpu_s / base_cpu_s:.2f}x",
                      f"{per_s / speeds['resnet18'][0]:.2f}x")
    console.print(table)
    console.print(f"load average {os.getloadavg()} (other jobs on the cores lower images/s; images/CPU-s less)")


def training_images_per_s(arch_params: dict, batch_size: int, seconds: float = 10.0) -> float:
    """Training throughput of the architecture (forward, backward, Adam step) on this machine, now."""
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE, **arch_params)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    targets = torch.rand(batch_size, 3, 32, 32)
    inputs = downsample(targets)
    images, start = 0, None
    for step in range(10**6):
        if step == 2:  # after warm-up
            images, start = 0, time.perf_counter()
        loss = (model(inputs) - targets).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += batch_size
        if start is not None and time.perf_counter() - start >= seconds:
            return images / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def recipe_rows() -> list[tuple[str, dict[str, str]]]:
    rows = [("default", dict(DEFAULT_RECIPE))]
    for flag, values in IDEAS.items():
        for value in values:
            if value != DEFAULT_RECIPE[flag]:
                rows.append((f"{flag.removeprefix('--')}={OFF.get(value, value)}", {**DEFAULT_RECIPE, flag: value}))
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["recipe", "model-data"], default="recipe",
                   help="recipe: the training ideas; model-data: the data mix and architectures (default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset (default: %(default)s)")
    p.add_argument("--natural", type=Path, default=PROJECT_ROOT.parent / "shared" / "datasets" / "sr-natural",
                   help="natural photographs for --suite model-data (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="--suite model-data: epochs per row (default: %(default)s)")
    p.add_argument("--epoch-size", type=int, default=None, help="--suite model-data: images per epoch (default: --limit-train)")
    p.add_argument("--rows", default=None, help="--suite model-data: comma-separated row numbers to run (1-based; default: all)")
    p.add_argument("--minutes-per-row", type=float, default=3.0, help="training budget of the default row (default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=10_000, help="seeded training subset (default: %(default)s)")
    p.add_argument("--limit-val", type=int, default=2_000, help="seeded validation subset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--arch-params", default="{}", help="JSON keyword arguments of subpixel_residual (default: its defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and inference (default: %(default)s)")
    p.add_argument("--speed-seconds", type=float, default=3.0, help="measuring time per inference-speed figure and round")
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved rounds of the speed figures (median)")
    p.add_argument("--speed-only", action="store_true",
                   help="only measure inference speed (freshly initialised --arch-params model against resnet18 and bicubic)")
    p.add_argument("--speed-candidates", default="[]", metavar="JSON",
                   help="--speed-only: a JSON list of further --arch-params to measure in the same rounds, e.g. "
                        "'[{\"width\": 64, \"depth\": 8, \"attention\": 16}]'")
    p.add_argument("--store", type=Path, default=None, help="store for the rows' models (default: a temporary directory)")
    p.add_argument("--cache-dir", type=Path, default=None, help="the trainer's dataset cache (default: the trainer's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=140, stderr=False)
    arch_params = json.loads(args.arch_params)
    if args.speed_only:
        print_speed_only(args, arch_params, console)
        return
    if args.suite == "model-data":
        model_data_ablation(args, console)
        return
    store_root = args.store or Path(tempfile.mkdtemp(prefix="ablation-store-"))
    store = ModelStore(store_root)

    per_s = training_images_per_s(arch_params, args.batch_size)
    epochs = max(1, math.floor(args.minutes_per_row * 60 * per_s / args.limit_train))
    console.print(f"{os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads, "
                  f"load average {os.getloadavg()[0]:.1f}; {ARCHITECTURE} {arch_params or '(defaults)'} trains at "
                  f"{per_s:,.0f} images/s now: {epochs} epochs of {args.limit_train:,} images per row; store {store_root}")

    common = ["--models", ARCHITECTURE, "--publish-as", STORE_NAME, "--arch-params", args.arch_params,
              "--data", str(args.data), "--store", str(store_root), "--limit-train", str(args.limit_train),
              "--limit-val", str(args.limit_val), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--seed", str(args.seed), "--max-minutes", str(2 * args.minutes_per_row), "--no-progress"]
    if args.cache_dir:
        common += ["--cache-dir", str(args.cache_dir)]
    trained: dict[str, tuple[int, dict]] = {}
    for i, (name, recipe) in enumerate(recipe_rows(), start=1):
        console.print(f"[{i}/{len(recipe_rows())}] training {name}: {' '.join(f'{k} {v}' for k, v in recipe.items())}")
        if train_main(common + [item for pair in recipe.items() for item in pair]) != 0:
            raise SystemExit(f"training row {name!r} failed (see the log above)")
        version = store.versions(STORE_NAME)[-1]
        trained[name] = (version, store.manifest(STORE_NAME, version))

    console.print(f"measuring inference speed at batch {SPEED_BATCH}")
    model, _ = store.load(STORE_NAME, trained["default"][0])
    speeds = inference_speeds(speed_forwards(model), SPEED_BATCH, args.speed_seconds, args.speed_rounds)
    speed, ensemble_speed, bicubic_speed, resnet18_speed = (speeds[k] for k in ("model", "self-ensemble", "bicubic", "resnet18"))

    bicubic = trained["default"][1]["metrics"]["bicubic"]

    def row(name: str, metrics: dict, manifest: dict | None, row_speed: tuple[float, float], version: int | None) -> Row:
        return Row(name, metrics["psnr"], metrics["ssim"], metrics["psnr"] - bicubic["psnr"],
                   manifest["epochs_completed"] if manifest else None,
                   manifest["wall_time_s"] / 60 if manifest else None, *row_speed, version=version)

    rows = [row("bicubic", bicubic, None, bicubic_speed, None)]
    rows += [row(name, manifest["metrics"]["model"], manifest, speed, version) for name, (version, manifest) in trained.items()]
    default_version, default_manifest = trained["default"]
    rows.insert(2, row("default + self-ensemble", default_manifest["metrics"]["self_ensemble"], default_manifest,
                       ensemble_speed, default_version))

    default_psnr = default_manifest["metrics"]["model"]["psnr"]
    table = Table(title=f"{ARCHITECTURE} ablation: {args.limit_train:,} training / {args.limit_val:,} validation images, "
                        f"seed {args.seed}, {epochs} epochs per row, batch {args.batch_size}, peak lr {args.lr:g}; "
                        f"default = {' '.join(f'{k} {v}' for k, v in DEFAULT_RECIPE.items())}")
    for column in ("row", "PSNR dB", "SSIM", "vs bicubic", "vs default", "epochs", "train min", "images/s", "images/CPU-s"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for r in rows:
        table.add_row(r.name, f"{r.psnr:.3f}", f"{r.ssim:.4f}", f"{r.gain_db:+.3f}",
                      "" if r.name == "bicubic" else f"{r.psnr - default_psnr:+.3f}",
                      "" if r.epochs is None else str(r.epochs),
                      "" if r.train_minutes is None else f"{r.train_minutes:.1f}",
                      f"{r.images_per_s:,.0f}", f"{r.images_per_cpu_s:,.0f}")
    table.add_row("resnet18 (speed reference, untrained)", "", "", "", "", "", "",
                  f"{resnet18_speed[0]:,.0f}", f"{resnet18_speed[1]:,.0f}")
    console.print(table)
    console.print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "default_recipe": DEFAULT_RECIPE, "epochs_per_row": epochs, "training_images_per_s": per_s,
            "rows": [asdict(r) for r in rows], "resnet18_speed": resnet18_speed,
        }, indent=2))


def model_data_ablation(args: argparse.Namespace, console: Console) -> None:
    """The model-data rows: natural-data share and architecture, at the same epochs, data and seed; both validation sets."""
    store_root = args.store or Path(tempfile.mkdtemp(prefix="ablation-store-"))
    store = ModelStore(store_root)
    chosen = [int(n) for n in args.rows.split(",")] if args.rows else list(range(1, len(MODEL_DATA_ROWS) + 1))
    rows = [MODEL_DATA_ROWS[n - 1] for n in chosen]
    epoch_size = args.epoch_size or args.limit_train
    console.print(f"{os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads, load average "
                  f"{os.getloadavg()[0]:.1f}; {args.epochs} epochs of {epoch_size:,} images per row; store {store_root}")
    common = ["--models", ARCHITECTURE, "--data", str(args.data), "--natural", str(args.natural), "--store", str(store_root),
              "--limit-train", str(args.limit_train), "--limit-val", str(args.limit_val), "--epochs", str(args.epochs),
              "--epoch-size", str(epoch_size), "--epoch-val", str(min(200, args.limit_val)), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--seed", str(args.seed), "--no-ensemble-metrics", "--no-progress",
              *[item for pair in DEFAULT_RECIPE.items() for item in pair]]
    if args.cache_dir:
        common += ["--cache-dir", str(args.cache_dir)]
    results = []
    for number, (name, params, share) in zip(chosen, rows):
        console.print(f"[row {number}] training {name}")
        store_name = f"row{number}"
        if train_main(common + ["--publish-as", store_name, "--arch-params", json.dumps(params), "--natural-share", str(share)]) != 0:
            raise SystemExit(f"training row {name!r} failed (see the log above)")
        results.append((number, name, params, store.manifest(store_name, store.versions(store_name)[-1])))

    console.print(f"measuring inference speed at batch {SPEED_BATCH}")
    architectures = {json.dumps(params, sort_keys=True): params for _, _, params, _ in results} | {"{}": {}}
    forwards = {key: build_model(ARCHITECTURE, **params).eval() for key, params in architectures.items()}
    speeds = inference_speeds({**forwards, "resnet18": build_model("resnet18").eval()}, SPEED_BATCH, args.speed_seconds,
                              args.speed_rounds)
    table = Table(title=f"{ARCHITECTURE}, data and architecture: {args.epochs} epochs of {epoch_size:,} images per row "
                        f"(CIFAR-10 part from a {args.limit_train:,}-image subset), seed {args.seed}, batch {args.batch_size}, "
                        f"peak lr {args.lr:g}, {' '.join(f'{k} {v}' for k, v in DEFAULT_RECIPE.items())}; CIFAR-10 validation: "
                        f"{args.limit_val:,} test images; natural validation: the fixed sr-natural tiles")
    for column in ("#", "row", "params", "CIFAR dB", "vs bicubic", "natural dB", "vs bicubic", "train min", "images/s",
                   "vs 48x6"):
        table.add_column(column, justify="left" if column == "row" else "right")
    bicubic = results[0][3]["metrics"]
    table.add_row("", "bicubic", "", f"{bicubic['bicubic']['psnr']:.3f}", "", f"{bicubic['natural']['bicubic']['psnr']:.3f}",
                  "", "", "", "")
    json_rows = []
    for number, name, params, manifest in results:
        metrics, natural = manifest["metrics"], manifest["metrics"]["natural"]
        per_s = speeds[json.dumps(params, sort_keys=True)][0]
        cifar_gain = metrics["model"]["psnr"] - metrics["bicubic"]["psnr"]
        natural_gain = natural["model"]["psnr"] - natural["bicubic"]["psnr"]
        table.add_row(str(number), name, f"{manifest['parameter_count']:,}", f"{metrics['model']['psnr']:.3f}",
                      f"{cifar_gain:+.3f}", f"{natural['model']['psnr']:.3f}", f"{natural_gain:+.3f}",
                      f"{manifest['wall_time_s'] / 60:.1f}", f"{per_s:,.0f}", f"{per_s / speeds['{}'][0]:.2f}x")
        json_rows.append({"row": number, "name": name, "arch_params": params, "natural_share": manifest["dataset"]["mix"],
                          "cifar_psnr": metrics["model"]["psnr"], "cifar_gain_db": cifar_gain,
                          "natural_psnr": natural["model"]["psnr"], "natural_gain_db": natural_gain,
                          "train_minutes": manifest["wall_time_s"] / 60, "epochs": manifest["epochs_completed"],
                          "images_per_s": per_s, "parameters": manifest["parameter_count"]})
    table.add_row("", "resnet18 (speed reference)", "", "", "", "", "", "", f"{speeds['resnet18'][0]:,.0f}", "")
    console.print(table)
    console.print(f"load average now {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "rows": json_rows, "speeds": speeds, "loadavg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
