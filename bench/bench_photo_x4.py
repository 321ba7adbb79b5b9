"""The standard x4 table: Set5 and Set14, PSNR on BT.601 luma with a 4-pixel border cropped, mean over the images.

    python bench/bench_photo_x4.py --store runs/photo/store --model photo          # + bicubic and pretrained upgrader tiled
    python bench/bench_photo_x4.py --store pretrained --model photo:1 --tiled none

Two degradations, two columns per set:
* `bicubic` (the published tables): the LR images as published (LR_bicubic_x4, MATLAB's antialiased bicubic
  reduction of HR cropped to a multiple of 4); `upgrader.imaging.bicubic_degrade` reproduces them;
* `bilinear` (the CIFAR models' own degradation): torch's antialiased bilinear reduction of the same HR, 8-bit.

Rows: bicubic upscaling (MATLAB's, the tables' "bicubic" row), every `--model` (any fully convolutional
architecture, run on the whole LR image in one forward; with --ensemble also averaged over its 8 dihedral views) and every `--tiled` model (run the way the service runs
8x8 models on larger images: service/runtime/tiling.py's overlapping 8x8 tiles, 8-bit tile outputs blended with the tent
window). Models are loaded from a model store (architecture from the manifest, checksum-verified safetensors).

Grayscale HR images (Set14 has one) are measured on their one channel, as the published evaluation code does
(it converts to luma only images with three channels). Outputs are rounded to 8 bits before measuring. Set5 and
Set14 are test sets: measure on them, never tune on them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_store import ModelStore  # noqa: E402
from upgrader.ensemble import DIHEDRAL, dihedral, undo_dihedral  # noqa: E402
from upgrader.imaging import imresize_bicubic, psnr_y, to_8bit  # noqa: E402

SCALE = 4
BENCHMARK = ROOT.parent / "shared" / "datasets" / "sr-benchmark"
PUBLISHED = {"bicubic": (28.42, 26.00), "SRCNN": (30.48, 27.49), "FSRCNN": (30.72, 27.61), "VDSR": (31.35, 28.01),
             "CARN-M": (31.92, 28.42), "EDSR": (32.46, 28.80)}


def read(path: Path) -> tuple[torch.Tensor, bool]:
    """float 1 x 3 x H x W in [0, 1], and whether the file is grayscale."""
    with Image.open(path) as image:
        gray = image.mode in ("L", "LA", "I;16")
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(255), gray


def score(output: torch.Tensor, hr: torch.Tensor, gray: bool) -> float:
    output = to_8bit(output)
    if gray:  # the one channel itself, not luma of three equal channels (which scales the error by 219/255)
        a, b = output[:, :1, SCALE:-SCALE, SCALE:-SCALE], hr[:, :1, SCALE:-SCALE, SCALE:-SCALE]
        return (-10 * torch.log10((a - b).pow(2).mean().clamp_min(1e-10))).item()
    return psnr_y(output, hr, border=SCALE).item()


def bilinear_lr(hr: torch.Tensor) -> torch.Tensor:
    """The CIFAR models' degradation (upgrader.imaging.downsample) at any size: antialiased bilinear, 8-bit."""
    size = (hr.shape[-2] // SCALE, hr.shape[-1] // SCALE)
    return to_8bit(F.interpolate(hr, size=size, mode="bilinear", antialias=True, align_corners=False))


def tiled_upscale(model: torch.nn.Module, lr: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The service's path for 8x8 models: overlapping 8x8 tiles, each output rounded to 8 bits, tent-blended."""
    from service.runtime.tiling import cut, layout, stitch
    from upgrader.architectures import fully_convolutional

    image = (lr[0] * 255).round().byte().numpy()
    plan = layout(image.shape[1], image.shape[2], overlapping=fully_convolutional(model.architecture_name))
    tiles = torch.from_numpy(cut(image, plan)).float().div(255)
    outputs = torch.cat([model(tiles[i : i + batch]) for i in range(0, len(tiles), batch)])
    stitched = stitch((to_8bit(outputs) * 255).round().byte().numpy(), plan)
    return torch.from_numpy(stitched)[None].float().div(255)


def ensemble_upscale(model: torch.nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """The 8 dihedral views one at a time (a non-square image's quarter turns change its shape), averaged."""
    return sum(undo_dihedral(model(dihedral(lr, turns, mirrored)), turns, mirrored) for turns, mirrored in DIHEDRAL) / len(DIHEDRAL)


def served_upscale(url: str, model: str, lr: torch.Tensor, ensemble: int = 1) -> torch.Tensor:
    """POST /upscale?tile=true of a running service, the LR image as a PNG, the answer as a PNG: what a client gets."""
    import httpx

    buffer = io.BytesIO()
    Image.fromarray((lr[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    params = {"tile": "true", "model": model, **({"ensemble": str(ensemble)} if ensemble > 1 else {})}
    answer = httpx.post(f"{url}/upscale", params=params, content=buffer.getvalue(), timeout=120,
                        headers={"content-type": "image/png", "accept": "image/png"})
    answer.raise_for_status()
    with Image.open(io.BytesIO(answer.content)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float().div(255)


def load(store: ModelStore, spec: str) -> tuple[str, torch.nn.Module]:
    name, _, version = spec.partition(":")
    model, manifest = store.load(name, version or "latest")
    model.architecture_name = manifest["architecture"]["name"]
    return f"{name}:{manifest['version']}", model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(ROOT / "pretrained"), help="store of the --model versions")
    p.add_argument("--model", action="append", default=[], metavar="NAME[:VERSION]", help="whole-image model (repeatable)")
    p.add_argument("--tiled-store", default=str(ROOT / "pretrained"), help="store of the --tiled versions")
    p.add_argument("--tiled", action="append", default=None, metavar="NAME[:VERSION]",
                   help="8x8 model run through the service's tiling (repeatable; default: upgrader; 'none': no such row)")
    p.add_argument("--ensemble", action="store_true", help="also each --model's (and --served model's) self-ensemble over the 8 dihedral views")
    p.add_argument("--url", help="a running service (e.g. http://127.0.0.1:8000): each --served model is measured through it")
    p.add_argument("--served", action="append", default=[], metavar="NAME",
                   help="a model of the service at --url, sent each LR image as a PNG via POST /upscale?tile=true (repeatable)")
    p.add_argument("--sets", default="Set5,Set14")
    p.add_argument("--degradations", default="bicubic,bilinear")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--benchmark", type=Path, default=BENCHMARK)
    p.add_argument("--json", type=Path, help="also write the table's means here, as {row: {'SET DEGRADATION': dB}}")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiled_specs = [s for s in (args.tiled or ["upgrader"]) if s != "none"]
    rows: list[tuple[str, str, torch.nn.Module | None]] = [("bicubic", "matlab", None)]
    whole = [load(ModelStore(args.store), s) for s in args.model]
    rows += [(label, "whole", model) for label, model in whole]
    rows += [(f"{label} (x8 ensemble)", "ensemble", model) for label, model in whole if args.ensemble]
    rows += [(f"{label} (tiled)", "tiled", model) for label, model in (load(ModelStore(args.tiled_store), s) for s in tiled_specs)]
    rows += [(f"{name} (through {args.url})", "served", name) for name in args.served]
    rows += [(f"{name} (through {args.url}, ensemble=8)", "served-ensemble", name) for name in args.served if args.ensemble]
    sets, degradations = args.sets.split(","), args.degradations.split(",")
    table: dict[tuple[str, str, str], float] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for set_name in sets:
            for hr_path in sorted((args.benchmark / set_name / "HR").glob("*.png")):
                hr, gray = read(hr_path)
                hr = hr[..., : hr.shape[-2] // SCALE * SCALE, : hr.shape[-1] // SCALE * SCALE]
                for degradation in degradations:
                    lr = read(args.benchmark / set_name / "LR_bicubic_x4" / hr_path.name)[0] if degradation == "bicubic" else bilinear_lr(hr)
                    for label, how, model in rows:
                        if how == "matlab":
                            output = imresize_bicubic(lr, SCALE, quantize=True)
                        elif how == "whole":
                            output = model(lr)
                        elif how == "ensemble":
                            output = ensemble_upscale(model, lr)
                        elif how == "served":
                            output = served_upscale(args.url, model, lr)
                        elif how == "served-ensemble":
                            output = served_upscale(args.url, model, lr, ensemble=8)
                        else:
                            output = tiled_upscale(model, lr)
                        table.setdefault((label, set_name, degradation), []).append(score(output, hr, gray))
    width = max(len(label) for label, _, _ in rows) + 2
    header = "".join(f"{f'{s} {d}':>16}" for d in degradations for s in sets)
    print(f"x4, PSNR-Y (dB), 4-px border, 8-bit outputs; LR: bicubic = published LR_bicubic_x4, bilinear = antialiased bilinear")
    print(f"{'':<{width}}{header}")
    for label, _, _ in rows:
        print(f"{label:<{width}}" + "".join(f"{np.mean(table[(label, s, d)]):>16.2f}" for d in degradations for s in sets))
    print("published (bicubic LR): " + ", ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in PUBLISHED.items()))
    print(f"({time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads)")
    if args.json:
        args.json.write_text(json.dumps({label: {f"{s} {d}": float(np.mean(table[(label, s, d)])) for d in degradations for s in sets}
                                         for label, _, _ in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
