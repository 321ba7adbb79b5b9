"""x4 models on photos as people have them: Set5 and Set14, PSNR-Y gain over bicubic upscaling of the same degraded
LR input, for a clean, two JPEG and a noisy version of each published LR image.

    python bench/bench_photo_degraded.py --model photo:2 --model runs/photo3/store=photo:1

Inputs (columns), each made from the published LR_bicubic_x4 image:
* `clean`: the published LR image itself;
* `jpeg90`, `jpeg75`: that image saved by Pillow as a JPEG at quality 90 / 75 and decoded
  (`upgrader.degradations.jpeg`, Pillow's default 4:2:0 chroma subsampling);
* `noise5`: Gaussian noise of sigma 5 levels (of 255) added to every channel, rounded to 8 bits; the noise is seeded
  by `--seed` and the image's set and name, so every model and every run sees the same noisy images.

`--sets heldout` measures the same on the 30 held-out sr-natural photographs instead (`trainer.natural`'s validation
split, never trained on; LR by `bicubic_degrade`): the set to compare degradation recipes on, since Set5 and Set14
must not be tuned on.

`--routed` adds a row for what the service answers when a request names no version: each input is judged by
`service.runtime.inputs` (a JPEG by its quality, anything else by its noise estimate) and upscaled by the first
`--model` (the clean one) when judged clean, by the second (the realistic one) otherwise; the row says how many
inputs went to the second.

Each cell is the mean over the set of (model PSNR-Y - bicubic PSNR-Y) on the same input: how much the model adds over
MATLAB-style bicubic upscaling of what it was given. The bicubic rows give the absolute PSNR-Y. Scoring (BT.601 luma,
4-pixel border, 8-bit outputs, grayscale images on their one channel) and model loading are bench_photo_x4.py's.
Runs in-process on the whole LR image in one forward, no service. Set5 and Set14 are test sets: measure, never tune.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_photo_x4 import BENCHMARK, SCALE, load, read, score  # noqa: E402  (a sibling script: bench/ is on sys.path)
from model_store import ModelStore  # noqa: E402
from upgrader.degradations import gaussian_noise, jpeg  # noqa: E402
from service.runtime import inputs as inputs_module  # noqa: E402
from upgrader.imaging import bicubic_degrade, imresize_bicubic, to_8bit  # noqa: E402

INPUTS = ("clean", "jpeg90", "jpeg75", "noise5")
ROUTED = "routed (service.runtime.inputs)"


def degraded_input(lr: torch.Tensor, kind: str, seed: int, key: str) -> torch.Tensor:
    """The published LR image (1 x 3 x h x w) as the `kind` input: clean, jpeg<quality> or noise<sigma in levels>."""
    if kind == "clean":
        return lr
    if kind.startswith("jpeg"):
        return jpeg(lr[0], int(kind[4:]))[None]
    if kind.startswith("noise"):
        generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
        return to_8bit(gaussian_noise(lr, int(kind[5:]) / 255, generator))
    raise ValueError(f"unknown input {kind!r}: use clean, jpeg<quality> or noise<sigma>")


def image_pairs(set_name: str, benchmark: Path, natural: Path) -> Iterator[tuple[str, torch.Tensor, bool, torch.Tensor]]:
    """(name, HR cropped to a multiple of 4, grayscale?, published LR) of every image of a benchmark set, or of the
    held-out sr-natural photographs for `heldout` (their LR: bicubic_degrade, what the published LR images are)."""
    if set_name == "heldout":
        from trainer.natural import load_natural_data
        from trainer.photo import validation_photos

        data = load_natural_data(natural, progress=False)
        for name, photo in zip(data.val_files, validation_photos(natural, data)):
            hr = photo[None].float() / 255
            yield name, hr, False, bicubic_degrade(hr, SCALE)
        return
    for hr_path in sorted((benchmark / set_name / "HR").glob("*.png")):
        hr, gray = read(hr_path)
        hr = hr[..., : hr.shape[-2] // SCALE * SCALE, : hr.shape[-1] // SCALE * SCALE]
        yield hr_path.name, hr, gray, read(benchmark / set_name / "LR_bicubic_x4" / hr_path.name)[0]


def parse_model(spec: str, default_store: str) -> tuple[str, str]:
    """`[STORE=]NAME[:VERSION]` -> (store, NAME[:VERSION])."""
    store, _, name = spec.rpartition("=")
    return store or default_store, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="[STORE=]NAME[:VERSION]",
                   help="a whole-image model, from STORE (default: --store) (repeatable; default: photo)")
    p.add_argument("--store", default=str(ROOT / "pretrained"), help="store of the --model versions that name none")
    p.add_argument("--sets", default="Set5,Set14", help="benchmark sets, or heldout: the held-out sr-natural photographs")
    p.add_argument("--natural", type=Path, default=ROOT.parent / "shared" / "datasets" / "sr-natural",
                   help="sr-natural, for --sets heldout")
    p.add_argument("--inputs", default=",".join(INPUTS), help="clean, jpeg<quality>, noise<sigma in levels>, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--benchmark", type=Path, default=BENCHMARK)
    p.add_argument("--routed", action="store_true", help="add the service's choice between the first two --model (clean, realistic)")
    args = p.parse_args(argv)
    if args.routed and len(args.model) < 2:
        p.error("--routed needs two --model: the clean one, then the realistic one")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = []
    for spec in args.model or ["photo"]:
        store, name = parse_model(spec, args.store)
        label, model = load(ModelStore(store), name)
        models.append((f"{label} ({store})", model))
    sets, inputs = args.sets.split(","), args.inputs.split(",")
    bicubic: dict[tuple[str, str], list[float]] = {}
    gains: dict[tuple[str, str, str], list[float]] = {}
    routed_to: dict[tuple[str, str], list[bool]] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for set_name in sets:
            for name, hr, gray, published in image_pairs(set_name, args.benchmark, args.natural):
                for kind in inputs:
                    lr = degraded_input(published, kind, args.seed, f"{set_name}/{name}")
                    baseline = score(imresize_bicubic(lr, SCALE, quantize=True), hr, gray)
                    bicubic.setdefault((set_name, kind), []).append(baseline)
                    for label, model in models:
                        gains.setdefault((label, set_name, kind), []).append(score(model(lr), hr, gray) - baseline)
                    if args.routed:
                        quality = int(kind[4:]) if kind.startswith("jpeg") else None  # what jpeg_quality reads from the file
                        pixels = to_8bit(lr)[0].mul(255).round().to(torch.uint8).numpy()
                        clean = inputs_module.looks_clean(pixels, quality)
                        routed_to.setdefault((set_name, kind), []).append(not clean)
                        model = models[0][1] if clean else models[1][1]
                        gains.setdefault((ROUTED, set_name, kind), []).append(score(model(lr), hr, gray) - baseline)
    columns = [(s, k) for k in inputs for s in sets]
    width = max(len(label) for label, _ in models) + 2
    print("x4, PSNR-Y gain over bicubic on the same input (dB), 4-px border, 8-bit outputs; inputs from the published "
          f"LR_bicubic_x4: clean, Pillow JPEG at quality N (jpegN), Gaussian noise of sigma N levels (noiseN, seed {args.seed})")
    print(f"{'':<{width}}" + "".join(f"{f'{s} {k}':>15}" for s, k in columns))
    print(f"{'bicubic (PSNR-Y)':<{width}}" + "".join(f"{np.mean(bicubic[c]):>15.2f}" for c in columns))
    for label, _ in models:
        print(f"{label:<{width}}" + "".join(f"{np.mean(gains[(label, s, k)]):>+15.2f}" for s, k in columns))
    if args.routed:
        print(f"{ROUTED:<{width}}" + "".join(f"{np.mean(gains[(ROUTED, s, k)]):>+15.2f}" for s, k in columns))
        print(f"{'  inputs to the second model':<{width}}" + "".join(f"{f'{sum(routed_to[c])}/{len(routed_to[c])}':>15}" for c in columns))
    print(f"({time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
