"""Score published versions again, as served and on exact floats, side by side with bicubic.

    .venv/bin/python bench/rescore.py --store runs/long64/store --model subpixel_residual --versions 1,2,3
    .venv/bin/python bench/rescore.py --store runs/long64/store --versions 2 --quarters   # where the gain is

The trainer publishes metrics measured as served (`trainer.train.evaluate`: 8-bit 8x8 inputs, as a client's
PNG holds them, and 8-bit 32x32 outputs, as the service's PNG answer holds them). Versions published before
that were measured on exact float inputs and outputs. This prints both protocols for every version named, on
the CIFAR-10 test split and the natural validation tiles, so old and new versions compare on one footing.
Nothing is written: manifests keep the numbers they were published with.
"""

from __future__ import annotations

import argparse
import os

import torch

from model_store import ModelStore
from trainer.data import batches, load_image_data
from trainer.natural import load_natural_data
from trainer.train import EVAL_BATCH_SIZE, evaluate
from upgrader.imaging import bicubic_upscale, downsample, psnr_per_image


@torch.inference_mode()
def gain_by_quarter(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[float, float]]:
    """(bicubic, model) mean PSNR in each quarter of the images, hardest first, ranked by bicubic's PSNR (exact floats)."""
    targets = images.float() / 255
    inputs = downsample(targets)
    model_psnr = torch.cat([psnr_per_image(model(x).float(), t) for x, t in zip(inputs.split(EVAL_BATCH_SIZE), targets.split(EVAL_BATCH_SIZE))])
    bicubic_psnr = psnr_per_image(bicubic_upscale(inputs), targets)
    quarters = bicubic_psnr.argsort().tensor_split(4)
    return [(bicubic_psnr[q].mean().item(), model_psnr[q].mean().item()) for q in quarters]


@torch.inference_mode()
def float_protocol(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR of the model and of bicubic on exact float inputs and outputs (the protocol before 8-bit)."""
    sums = {"model": 0.0, "bicubic": 0.0}
    for targets in batches(images, EVAL_BATCH_SIZE, torch.device("cpu"), shuffle=False):
        inputs = downsample(targets)
        sums["model"] += psnr_per_image(model(inputs).float(), targets).sum().item()
        sums["bicubic"] += psnr_per_image(bicubic_upscale(inputs), targets).sum().item()
    return {who: total / len(images) for who, total in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--model", default="subpixel_residual")
    p.add_argument("--versions", default="latest", help="comma-separated versions or aliases")
    p.add_argument("--data", default=os.environ.get("UPGRADER_DATA", "../shared/datasets/cifar10-jpeg"))
    p.add_argument("--natural", default=os.environ.get("UPGRADER_NATURAL_DATA", "../shared/datasets/sr-natural"))
    p.add_argument("--quarters", action="store_true",
                   help="also the gain over bicubic in each quarter of the images, ranked by bicubic's PSNR (exact floats)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = ModelStore(args.store)
    splits = {"CIFAR-10 test": load_image_data(args.data, progress=False).val,
              "natural val": load_natural_data(args.natural, progress=False).val}
    print(f"store {args.store}, model {args.model}")
    print("| version | split | as served: model | bicubic | gain | exact floats: model | bicubic | gain | published with |")
    print("|---|---|---|---|---|---|---|---|---|")
    for version in args.versions.split(","):
        model, manifest = store.load(args.model, version)
        for split, images in splits.items():
            served = evaluate(model, images, torch.device("cpu"), loss_name="l1", baseline=True)
            floats = float_protocol(model, images)
            print(f"| {manifest['version']} | {split} | {served['model']['psnr']:.3f} | {served['bicubic']['psnr']:.3f} | "
                  f"**{served['model']['psnr'] - served['bicubic']['psnr']:+.3f}** | {floats['model']:.3f} | {floats['bicubic']:.3f} | "
                  f"{floats['model'] - floats['bicubic']:+.3f} | {manifest.get('evaluation', 'exact floats')} |", flush=True)
            if args.quarters:
                print(f"|   | {split}, hardest to easiest quarter: "
                      + ", ".join(f"{b:.2f} → {m:.2f} ({m - b:+.2f})" for b, m in gain_by_quarter(model, images)) + " |", flush=True)


if __name__ == "__main__":
    main()
