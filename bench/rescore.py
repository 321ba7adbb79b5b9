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
def float_psnrs(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR of the model and of bicubic on exact float inputs and outputs (the protocol before 8-bit)."""
    model_psnr, bicubic_psnr = [], []
    for targets in batches(images, EVAL_BATCH_SIZE, torch.device("cpu"), shuffle=False):
        inputs = downsample(targets)
        model_psnr.append(psnr_per_image(model(inputs).float(), targets))
        bicubic_psnr.append(psnr_per_image(bicubic_upscale(inputs), targets))
    return torch.cat(model_psnr), torch.cat(bicubic_psnr)


def by_quarter(model_psnr: torch.Tensor, bicubic_psnr: torch.Tensor) -> list[tuple[float, float]]:
    """(bicubic, model) mean PSNR in each quarter of the images, hardest first, ranked by bicubic's PSNR."""
    return [(bicubic_psnr[q].mean().item(), model_psnr[q].mean().item()) for q in bicubic_psnr.argsort().tensor_split(4)]


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
            model_psnr, bicubic_psnr = float_psnrs(model, images)
            floats = {"model": model_psnr.mean().item(), "bicubic": bicubic_psnr.mean().item()}
            print(f"| {manifest['version']} | {split} | {served['model']['psnr']:.3f} | {served['bicubic']['psnr']:.3f} | "
                  f"**{served['model']['psnr'] - served['bicubic']['psnr']:+.3f}** | {floats['model']:.3f} | {floats['bicubic']:.3f} | "
                  f"{floats['model'] - floats['bicubic']:+.3f} | {manifest.get('evaluation', 'exact floats')} |", flush=True)
            if args.quarters:
                print(f"|   | {split}, hardest to easiest quarter: "
                      + ", ".join(f"{b:.2f} → {m:.2f} ({m - b:+.2f})" for b, m in by_quarter(model_psnr, bicubic_psnr)) + " |", flush=True)


if __name__ == "__main__":
    main()
