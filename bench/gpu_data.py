"""Pack the training data (and a version to start from) small enough to travel to a leased GPU machine.

    .venv/bin/python bench/gpu_data.py --init runs/s14gpu/store/subpixel_residual/7   # then carry .gpupack (git-ignored)

The device tool sends the working tree and the carried paths, 64 MiB in all, and counts what a tar of them
holds: ~1 KB of header and padding per file. CIFAR-10's 60,000 JPEGs are ~0.9 KB each, so as files they count
almost twice their bytes, and a `.gpudata` of 56 MB of files is refused. Their headers are also
nearly identical (the same quantisation and Huffman tables), so one gzipped tar of everything is ~45% smaller
than its contents. So this writes a folder and then one archive of it:

  OUT/cifar/test/...          all of CIFAR-10's test split (the metrics a published model reports)
  OUT/cifar/train/...         the same number of training images from each class, first in sorted
                              order, within what is left of the budget after the photographs (the
                              defaults take all 50,000)
  OUT/natural/bsd200, yang91  the 30 held-out photographs, named in OUT/natural/validation.txt so the
                              trainer holds out exactly the validation set of the whole sr-natural
                              (trainer/natural.py), and as many training photographs as fit, T91 first
                              (small, many crops per byte), in sorted order; BMPs become PNGs (lossless)
  OUT/init/NAME/VERSION/      with --init: a published version (its folder in a store), for gpu_train.sh's
                              INIT_STORE=OUT/init (fine-tune or grow it there)
  OUT/PACKED.json             what was taken, and the bytes
  PACK (.gpupack/gpudata.tgz) the gzipped tar of OUT: what travels (carry its folder); bench/gpu_train.sh and
                              bench/gpu_check.sh unpack it there when OUT is absent

So a model trained there reports metrics on the same validation images as one trained here on all the
data; only its training photographs are fewer, and PACKED.json and the manifest's dataset fingerprints say so.
The defaults (all of CIFAR-10, 33 MB of photographs) make a ~56 MB archive: with the wheels (~4 MB) and the
tree it travels.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared" / "datasets"


def as_png(path: Path) -> bytes:
    """A photograph's bytes as a PNG (BMP is stored raw: three times the size for the same pixels)."""
    if path.suffix.lower() == ".png":
        return path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def pack_natural(source: Path, out: Path, budget: int) -> dict:
    """The validation photographs, then training photographs until `budget` bytes; -> what was written."""
    from trainer.natural import _list_files, is_validation  # the trainer's own listing and split, not a copy of them

    chosen: list[tuple[str, bytes, bool]] = []
    for subset, names in _list_files(source).items():
        for index, name in enumerate(names):
            chosen.append((name, as_png(source / name), is_validation(subset, index)))
    validation = [(name, data) for name, data, held in chosen if held]
    training = sorted(((name, data) for name, data, held in chosen if not held), key=lambda item: not item[0].startswith("yang91/"))
    used = sum(len(data) for _, data in validation)
    taken = []
    for name, data in training:
        if used + len(data) > budget:
            continue
        taken.append((name, data))
        used += len(data)
    written = []
    for name, data in validation + taken:
        target = out / Path(name).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target.relative_to(out).as_posix())
    (out / "validation.txt").write_text("".join(f"{Path(name).with_suffix('.png').as_posix()}\n" for name, _ in validation))
    return {"validation_images": len(validation), "training_images": len(taken), "training_images_left_out": len(training) - len(taken),
            "bytes": used}


def pack_cifar(source: Path, out: Path, budget: int) -> dict:
    """All of test/, then an equal number of training images per class within what is left of `budget`."""
    shutil.copytree(source / "test", out / "test")
    used = sum(f.stat().st_size for f in (out / "test").rglob("*") if f.is_file())
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    files = {c: sorted((source / "train" / c).iterdir()) for c in classes}
    per_class = 0
    while all(per_class < len(files[c]) for c in classes):  # grow one image per class at a time while it fits
        row = sum(files[c][per_class].stat().st_size for c in classes)
        if used + row > budget:
            break
        used += row
        per_class += 1
    for c in classes:
        (out / "train" / c).mkdir(parents=True)
        for path in files[c][:per_class]:
            shutil.copyfile(path, out / "train" / c / path.name)
    return {"test_images": sum(1 for f in (out / "test").rglob("*") if f.is_file()), "train_per_class": per_class,
            "train_images": per_class * len(classes), "bytes": used}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / ".gpudata", help="the folder to write (emptied first)")
    p.add_argument("--pack", type=Path, default=PROJECT_ROOT / ".gpupack" / "gpudata.tgz",
                   help="the archive of OUT to write, which travels (the tree and any wheels travel too: 64 MiB in all)")
    p.add_argument("--budget-mb", type=float, default=90.0, help="MB of files for both datasets, before compression (the archive is ~40%% smaller)")
    p.add_argument("--natural-share-mb", type=float, default=33.0, help="MB of the budget for the photographs (validation ones first)")
    p.add_argument("--init", type=Path, default=None, metavar="STORE/NAME/VERSION",
                   help="a published version's folder to take along as OUT/init/NAME/VERSION (gpu_train.sh's INIT_STORE)")
    p.add_argument("--cifar", type=Path, default=SHARED / "cifar10-jpeg")
    p.add_argument("--natural", type=Path, default=SHARED / "sr-natural")
    args = p.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    natural = pack_natural(args.natural, args.out / "natural", int(args.natural_share_mb * 1e6))
    cifar = pack_cifar(args.cifar, args.out / "cifar", int(args.budget_mb * 1e6) - natural["bytes"])
    packed = {"natural": natural, "cifar": cifar, "bytes": natural["bytes"] + cifar["bytes"], "sources": [str(args.cifar), str(args.natural)]}
    if args.init is not None:
        version = args.init.resolve()
        if not (version / "manifest.json").is_file():
            raise SystemExit(f"--init {args.init}: no manifest.json there (give a store's NAME/VERSION folder)")
        shutil.copytree(version, args.out / "init" / version.parent.name / version.name)
        packed["init"] = f"{version.parent.name}:{version.name}"
    (args.out / "PACKED.json").write_text(json.dumps(packed, indent=2) + "\n")
    args.pack.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.pack, "w:gz") as archive:  # paths inside start with OUT's name, so it unpacks beside the tree
        archive.add(args.out, arcname=args.out.name)
    packed["pack"] = {"path": str(args.pack), "bytes": args.pack.stat().st_size}
    print(json.dumps(packed, indent=2))
    return packed


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(PROJECT_ROOT))
    main()
