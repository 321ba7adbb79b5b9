"""bf16 against float32 on this CPU, and the self-ensembles: speed and quality of published versions, as served.

    .venv/bin/python bench/bench_precision.py --store runs/s12b/store --versions subpixel_residual:4,subpixel_residual:5
    .venv/bin/python bench/bench_precision.py --store store        # every model's serving version (make run's store)
    .venv/bin/python bench/bench_precision.py --store store --ensembles 2,4,8   # and the quality dial of ?ensemble=

Each version is loaded as the service loads it (`service.runtime.upscaler.Upscaler`: verified, and run in whichever
memory format and way, plain or frozen trace or OpenVINO, is fastest here) and run through its forward pass
(`Upscaler.predict`) in float32, the baseline; in float32 as TorchScript only, a plain or frozen trace (a
second baseline); as a plain trace (a third); and in bf16, as
UPGRADER_PRECISION=bfloat16 (and auto, on a CPU with native bf16) serves it; with
--ensembles, also bf16 with `?ensemble=k` (k views in one forward pass). Columns:

- images/s and images per CPU-second of this process at batch 64 with --threads torch threads (1: the
  issue's measurement), medians of --rounds interleaved rounds, so other jobs on the cores hit all alike;
- PSNR as served (`trainer.train.evaluate`: 8-bit 8x8 in, 8-bit 32x32 out) on the whole CIFAR-10 test
  split and the natural validation tiles, against float32's; and for bf16 the largest difference of any
  output pixel from float32's on CIFAR-10.
"""

from __future__ import annotations

import argparse
import os

import torch
from ablation import inference_speeds
from rich.console import Console
from rich.table import Table

from model_store import ModelStore
from service.runtime.upscaler import Upscaler
from trainer.data import batches, load_image_data
from trainer.natural import load_natural_data
from trainer.train import EVAL_BATCH_SIZE, evaluate
from upgrader.cpus import native_bf16_cpu
from upgrader.imaging import downsample, to_8bit

SPEED_BATCH = 64
TRACE_ONLY = "float32, trace only"  # the service's forward before frozen traces could be chosen
TORCHSCRIPT_ONLY = "float32, TorchScript only"  # the service's forwards without OpenVINO


class AsServed(torch.nn.Module):
    """The service's own forward pass, `Upscaler.predict`, as a module `evaluate` can score (ensemble: views per image)."""

    def __init__(self, upscaler: Upscaler, ensemble: int = 1) -> None:
        super().__init__()
        self.upscaler, self.ensemble = upscaler, ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upscaler.predict(x, self.ensemble)


@torch.inference_mode()
def largest_pixel_change(first: torch.nn.Module, second: torch.nn.Module, images: torch.Tensor) -> int:
    """The largest difference, in 8-bit levels, between two forwards' served outputs over `images`."""
    largest = 0
    for targets in batches(images, EVAL_BATCH_SIZE, torch.device("cpu"), shuffle=False):
        inputs = to_8bit(downsample(targets))
        a, b = ((forward(inputs).float().clamp(0, 1) * 255).round() for forward in (first, second))
        largest = max(largest, int((a - b).abs().max()))
    return largest


def served_versions(store: ModelStore, spec: str | None) -> list[tuple[str, str]]:
    if spec:
        return [tuple(item.split(":", 1)) for item in spec.split(",")]  # type: ignore[misc]
    return [(name, "latest") for name in store.models()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=os.environ.get("UPGRADER_STORE", "store"))
    p.add_argument("--versions", default=None, help="comma-separated NAME:VERSION (default: every model's latest)")
    p.add_argument("--data", default=os.environ.get("UPGRADER_DATA", "../shared/datasets/cifar10-jpeg"))
    p.add_argument("--natural", default=os.environ.get("UPGRADER_NATURAL_DATA", "../shared/datasets/sr-natural"))
    p.add_argument("--threads", type=int, default=1, help="torch threads for the speed figures")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per speed figure and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--no-quality", action="store_true", help="speed only")
    p.add_argument("--ensembles", default="", help="comma-separated ?ensemble= sizes to measure too, in bf16 (2, 4, 8)")
    args = p.parse_args()
    console = Console(width=200)
    if not native_bf16_cpu():
        console.print("[yellow]this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated here, and auto serves float32")
    store = ModelStore(args.store)
    splits = {} if args.no_quality else {
        "CIFAR-10": load_image_data(args.data, progress=False).val,
        "natural": load_natural_data(args.natural, progress=False).val,
    }
    ensembles = [int(k) for k in args.ensembles.split(",") if k]
    table = Table(title=f"as served: batch {SPEED_BATCH}, {args.threads} thread(s), median of {args.rounds} interleaved rounds of "
                        f"{args.seconds:g} s; PSNR as served on the whole sets, against float32's")
    for column in ("version", "forward", "runs as", "format", "images/s", "images/CPU-s", "vs float32", *splits, "largest change"):
        table.add_column(column, justify="left" if column in ("version", "forward", "runs as", "format") else "right")
    for name, version in served_versions(store, args.versions):
        torch.set_num_threads(args.threads)  # setup times the memory formats at this thread count, as a worker does
        upscalers = {precision: Upscaler(store, name, store.resolve(name, version), torch.device("cpu"), SPEED_BATCH, precision)
                     for precision in ("float32", "bfloat16")}
        upscalers[TRACE_ONLY] = Upscaler(store, name, store.resolve(name, version), torch.device("cpu"), SPEED_BATCH, "float32")
        upscalers[TRACE_ONLY].cpu_forwards = ("trace",)  # a plain trace alone: the baseline
        upscalers[TORCHSCRIPT_ONLY] = Upscaler(store, name, store.resolve(name, version), torch.device("cpu"), SPEED_BATCH, "float32")
        upscalers[TORCHSCRIPT_ONLY].cpu_forwards = ("trace", "frozen")  # no OpenVINO: a second baseline
        for upscaler in upscalers.values():
            upscaler.setup()
        label = f"{name}:{upscalers['float32'].version}"
        forwards = {precision: AsServed(upscaler) for precision, upscaler in upscalers.items()}
        forwards |= {f"bfloat16, ensemble={k}": AsServed(upscalers["bfloat16"], ensemble=k) for k in ensembles}
        speeds = inference_speeds(forwards, SPEED_BATCH, args.seconds, args.rounds)
        torch.set_num_threads(os.cpu_count() or 1)
        scores: dict[str, dict[str, float]] = {row: {} for row in forwards}
        for split, images in splits.items():
            for row, forward in forwards.items():
                scores[row][split] = evaluate(forward, images, torch.device("cpu"), loss_name="l1", baseline=False)["model"]["psnr"]
        change = largest_pixel_change(forwards["float32"], forwards["bfloat16"], splits["CIFAR-10"]) if splits else None
        for row, forward in forwards.items():
            per_s, per_cpu_s = speeds[row]
            quality = [f"{scores[row][s]:.4f}" + ("" if row == "float32" else f" ({scores[row][s] - scores['float32'][s]:+.4f})")
                       for s in splits]
            table.add_row(label, row, forward.upscaler.forward, str(forward.upscaler.memory_format).removeprefix("torch."),
                          f"{per_s:,.0f}", f"{per_cpu_s:,.0f}",
                          f"{per_s / speeds['float32'][0]:.2f}x", *quality,
                          f"{change} levels" if row == "bfloat16" and change is not None else "")
        console.print(table)  # after each version, so a long run shows progress
    console.print(f"load average {os.getloadavg()} (other jobs on the cores lower images/s; images/CPU-s less)")


if __name__ == "__main__":
    main()
