"""One epoch of the reference article's data pipeline against this trainer's.

    .venv/bin/python bench/bench_data_pipeline.py --limit 10000 --cold --threads 1   # ~2 minutes on 2 busy cores
    .venv/bin/python bench/bench_data_pipeline.py --workers 2                        # all 50,000, plus 2 DataLoader workers

  article    two torch DataLoaders over torchvision ImageFolder(train) with PIL transforms, Resize(8) +
             ToTensor for the inputs and ToTensor for the targets, zipped; num_workers 0 as in the article
             (`--workers N` adds a row with N workers). Both loaders shuffle with identically seeded generators,
             so the zipped pairs stay aligned, as the trainer shuffles too.
  trainer    the decoded uint8 dataset (trainer.data.load_image_data, from its cache), trainer.data.batches
             and upgrader.imaging.downsample per batch.

Both use the first `--limit` training images (the same images: the data layer lists files in
ImageFolder's order) and feed the same freshly seeded `conv` model, Adam lr 1e-3 and MSE, batch 128,
through the same `train_step`, in the same process, one after the other. Each pipeline is timed twice:
"data only" (the batches are made and dropped: what the pipeline itself costs) and "epoch" (with the
training step). The trainer's one-time cost, loading the dataset, is printed above the table: from
the cache, and with `--cold` also decoding into a fresh temporary cache first.

CPU columns: seconds used by this process and its DataLoader workers, and by everything else on the
machine (other jobs share the cores), so a slow row can be told apart from a contended one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from bench_service import machine_busy_s  # a sibling script: bench/ is on sys.path when this file runs
from trainer.data import batches, load_image_data, place_on_device
from upgrader.architectures import build_model
from upgrader.imaging import downsample

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = os.environ.get("UPGRADER_DATA") or str(PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg")
LR = 1e-3  # the reference recipe: Adam lr 1e-3, MSE


@dataclass
class Row:
    section: str  # "data only" or "epoch"
    pipeline: str
    images: int
    seconds: float
    cpu_s: float  # this process and its (reaped) DataLoader workers
    other_cpu_s: float  # the rest of the machine in the same interval

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def images_per_cpu_s(self) -> float:
        return self.images / self.cpu_s


def own_cpu_s() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def reference_pairs(data: Path, limit: int, batch_size: int, workers: int, seed: int, device: torch.device):
    """The article's pipeline: inputs and targets from two DataLoaders over the same ImageFolder, zipped.

    The datasets are built here, before the clock starts, as a training script builds them once.
    """

    def loader(transform) -> DataLoader:
        subset = Subset(datasets.ImageFolder(data / "train", transform=transform), range(limit))
        return DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=workers,
                          generator=torch.Generator().manual_seed(seed))

    inputs = loader(transforms.Compose([transforms.Resize(8), transforms.ToTensor()]))
    targets = loader(transforms.ToTensor())
    return ((x.to(device), y.to(device)) for (x, _), (y, _) in zip(inputs, targets))


def trainer_pairs(train: torch.Tensor, batch_size: int, seed: int, device: torch.device):
    """This trainer's pipeline: batches of the in-memory uint8 dataset, 8x8 inputs made per batch on the device."""
    for targets in batches(train, batch_size, device, shuffle=True, epoch=0, seed=seed):
        yield downsample(targets), targets


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def measure(section: str, pipeline: str, pairs: Iterable, device: torch.device, seed: int, train: bool) -> Row:
    torch.manual_seed(seed)  # the same initial weights for every pipeline
    model = build_model("conv").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    images = 0
    cpu, busy, start = own_cpu_s(), machine_busy_s(), time.perf_counter()
    for inputs, targets in pairs:
        if train:
            train_step(model, optimizer, inputs, targets)
        images += len(targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu, busy = time.perf_counter() - start, own_cpu_s() - cpu, machine_busy_s() - busy
    return Row(section, pipeline, images, seconds, cpu, max(0.0, busy - cpu))


def timed(load: Callable):
    start = time.perf_counter()
    result = load()
    return result, time.perf_counter() - start


def print_table(rows: list[Row], console: Console) -> None:
    table = Table(title="one epoch of the conv upgrader's data pipeline; speed-up over the article's in the same section, "
                        "by wall time and by this process's CPU time (steadier when other jobs share the cores)")
    for column in ("section", "pipeline", "images", "seconds", "images/s", "CPU s", "other CPU s", "speed-up", "by CPU"):
        table.add_column(column, justify="left" if column in ("section", "pipeline") else "right")
    for row in rows:
        baseline = next(r for r in rows if r.section == row.section)  # the article's pipeline, workers 0
        table.add_row(row.section, row.pipeline, f"{row.images:,}", f"{row.seconds:.1f}", f"{row.images_per_s:,.0f}",
                      f"{row.cpu_s:.1f}", f"{row.other_cpu_s:.1f}", f"{row.images_per_s / baseline.images_per_s:.1f}x",
                      f"{row.images_per_cpu_s / baseline.images_per_cpu_s:.1f}x")
    console.print(table)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder tree with train/ and test/ (default: %(default)s)")
    p.add_argument("--limit", type=int, default=50_000, help="use the first N training images (default: all %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="also measure the reference with N DataLoader workers")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both pipelines (default: torch's, one per core; 1 is faster on busy cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s, the machine the target was set for)")
    p.add_argument("--cold", action="store_true", help="also decode the dataset into a fresh temporary cache (one-time cost)")
    p.add_argument("--cache-dir", type=Path, default=None, help="the trainer's dataset cache (default: $UPGRADER_CACHE or .cache/datasets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows and load times here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=120)
    console.print(f"{os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads, device {device}, "
                  f"load average {os.getloadavg()[0]:.1f}, data {args.data}")

    loads = {}
    if args.cold:
        with tempfile.TemporaryDirectory() as fresh:
            _, loads["decode into a fresh cache"] = timed(lambda: load_image_data(args.data, cache_dir=fresh, progress=False))
    data, loads["load from the cache"] = timed(lambda: load_image_data(args.data, cache_dir=args.cache_dir, progress=False))
    for what, seconds in loads.items():
        console.print(f"trainer dataset, {what}: {seconds:.1f} s for {len(data.train) + len(data.val):,} images (once per run)")
    limit = min(args.limit, len(data.train))
    train = place_on_device(data.train[:limit], device)

    references = [0] + ([args.workers] if args.workers else [])
    rows = []
    for section, with_training in (("data only", False), ("epoch", True)):
        for workers in references:
            pairs = reference_pairs(args.data, limit, args.batch_size, workers, args.seed, device)
            rows.append(measure(section, f"article, {workers} workers", pairs, device, args.seed, with_training))
        pairs = trainer_pairs(train, args.batch_size, args.seed, device)
        rows.append(measure(section, "trainer", pairs, device, args.seed, with_training))

    print_table(rows, console)
    console.print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        rows_out = [asdict(r) | {"images_per_s": r.images_per_s, "images_per_cpu_s": r.images_per_cpu_s} for r in rows]
        args.json.write_text(json.dumps({"args": vars(args) | {"data": str(args.data)}, "loads_s": loads, "rows": rows_out},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
