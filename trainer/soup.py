"""Model soup: publish the average of the weights of separately trained versions of one architecture.

    python -m trainer.soup --store store --model subpixel_residual --versions 3,4,5 --data ../shared/datasets/cifar10-jpeg

A uniform soup (Wortsman et al. 2022): the ingredients' tensors averaged one by one, then
evaluated exactly like a freshly trained model (the trainer's `evaluate`, against bicubic and
with self-ensemble) and published as a new version of --model whose manifest names the versions
it averaged and what each of them scored, so the soup can be compared with its best ingredient.
Averaging only makes sense for runs that stay in one basin of the loss, i.e. that start from the
same initial weights (same --seed) and differ in the rest of the recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from model_store import ModelStore, StoreError
from trainer import distributed
from trainer.data import load_image_data, place_on_device
from trainer.train import EVALUATION, draw_samples, evaluate, logfmt
from upgrader.architectures import build_model

log = logging.getLogger("trainer.soup")


def version_list(text: str) -> list[int]:
    try:
        versions = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated version numbers like 3,4,5, got {text!r}") from None
    if len(versions) < 2 or len(set(versions)) != len(versions):
        raise argparse.ArgumentTypeError(f"a soup needs at least two distinct versions, got {text!r}")
    return versions


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="store name of the model whose versions are averaged")
    p.add_argument("--versions", type=version_list, required=True, metavar="V1,V2,...",
                   help="the versions to average (at least two, all of the same architecture)")
    p.add_argument("--store", default=None, help="model store: a directory or s3://bucket/prefix (default: $UPGRADER_STORE or ./store)")
    p.add_argument("--data", type=Path, default=os.environ.get("UPGRADER_DATA"),
                   help="dataset whose validation split the soup is evaluated on (default: $UPGRADER_DATA)")
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-tensor cache (default: $UPGRADER_CACHE or ./.cache)")
    p.add_argument("--limit-val", type=int, default=None, metavar="N", help="evaluate on a fixed, seeded subset of N images")
    p.add_argument("--seed", type=int, default=0, help="picks the --limit-val subset (the trainer's --seed picks the same)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when present")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The elementwise mean of floating-point tensors (accumulated in float64); other tensors
    (e.g. BatchNorm's num_batches_tracked counters) are taken from the first state dict."""
    first = state_dicts[0]
    for i, other in enumerate(state_dicts[1:], start=2):
        if other.keys() != first.keys() or any(other[k].shape != v.shape for k, v in first.items()):
            raise ValueError(f"ingredient {i} has different tensors than ingredient 1; only one architecture can be averaged")
    averaged = {}
    for key, tensor in first.items():
        if tensor.dtype.is_floating_point:
            total = sum(sd[key].double() for sd in state_dicts)
            averaged[key] = (total / len(state_dicts)).to(tensor.dtype)
        else:
            averaged[key] = tensor.clone()
    return averaged


def make_soup(store: ModelStore, name: str, versions: list[int]) -> tuple[torch.nn.Module, list[dict]]:
    """Average verified versions of `name` into one eval-mode model; also returns their manifests."""
    loaded = [store.load_state_dict(name, v) for v in versions]
    manifests = [manifest for _, manifest in loaded]
    architecture = manifests[0]["architecture"]
    for version, manifest in zip(versions, manifests):
        if manifest["architecture"] != architecture:
            raise ValueError(f"{name} version {version} is {manifest['architecture']}, version {versions[0]} is "
                             f"{architecture}: a soup averages versions of one architecture")
    model = build_model(architecture["name"], **architecture.get("params", {}))
    model.load_state_dict(average_state_dicts([state_dict for state_dict, _ in loaded]))
    return model.eval(), manifests


def soup_manifest(versions: list[int], ingredients: list[dict], metrics: dict, args: argparse.Namespace,
                  device: torch.device) -> dict:
    first = ingredients[0]
    return {
        **{key: first[key] for key in ("architecture", "parameter_count", "input_shape", "output_shape", "dataset")},
        "recipe": {"soup": "uniform", "versions": versions},
        "soup": {
            "method": "uniform average of the weights",
            "versions": versions,
            "ingredients": [{"version": v, "recipe": m.get("recipe"), "metrics": m.get("metrics"),
                             "epochs_completed": m.get("epochs_completed")} for v, m in zip(versions, ingredients)],
        },
        "weights": "soup",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": [],
        "metrics": metrics,
        "evaluation": EVALUATION,
        "device": device.type,
        "device_name": distributed.describe(device),
        # What the soup cost: the training of all of its ingredients.
        "wall_time_s": sum(m.get("wall_time_s", 0.0) for m in ingredients),
        "epochs_completed": sum(m.get("epochs_completed", 0) for m in ingredients),
        "torch_version": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required (or set UPGRADER_DATA)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    device = distributed.setup(args.device).device
    store = ModelStore(args.store)
    try:
        model, ingredients = make_soup(store, args.model, args.versions)
        data = load_image_data(args.data, cache_dir=args.cache_dir, limit_val=args.limit_val, seed=args.seed,
                               progress=not args.no_progress)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        log.error("event=failed model=%s versions=%s error=%s", args.model, args.versions, exc)
        return 1
    model.to(device)
    val = place_on_device(data.val, device)
    metrics = evaluate(model, val, device, loss_name=ingredients[0]["recipe"]["loss"], baseline=True, ensemble=True)
    metrics.pop("loss")
    ingredient_psnr = {v: m["metrics"]["model"]["psnr"] for v, m in zip(args.versions, ingredients)}
    best = max(ingredient_psnr, key=ingredient_psnr.get)
    log.info("event=evaluated model=%s soup_of=%s %s best_ingredient=%d best_ingredient_psnr=%.6g", args.model,
             args.versions, logfmt(metrics["model"]), best, ingredient_psnr[best])
    title = (f"{args.model}: soup of versions {','.join(map(str, args.versions))}\n"
             f"PSNR {metrics['model']['psnr']:.2f} dB (bicubic {metrics['bicubic']['psnr']:.2f})")
    files = {"samples.png": draw_samples(model, data.val, device, title)}
    version = store.publish(args.model, model.state_dict(), soup_manifest(args.versions, ingredients, metrics, args, device),
                            files=files)
    log.info("event=published model=%s version=%d soup_of=%s store=%s", args.model, version, args.versions, store.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
