"""Natural photographs for training and validation: `sr-natural` (BSDS300's 200 training images, T91).

    <root>/bsd200/*.png    BSDS300 train: 200 photographs, 481x321 or 321x481
    <root>/yang91/*.bmp    T91 (Yang et al.): 91 small photographs, 78x78 to 508x233

Every image is decoded once and cached (one safetensors file per fingerprint, like the CIFAR-10 cache
in trainer/data.py). Training takes fresh random 32x32 crops of the full-resolution photographs every
epoch; their 8x8 inputs are made by the trainer exactly as for CIFAR-10 (`upgrader.imaging.downsample`).

A fixed part is held out and never trained on (`is_validation`): in sorted file order, every 10th
image of bsd200 (20 images: 0, 10, ..., 190) and every 9th of yang91 up to the 10th (10 images:
0, 9, ..., 81). The validation set is every non-overlapping 32x32 tile of those 30 images on a grid
from the top-left corner: the same crops on every run.

A folder may instead name its held-out files in `validation.txt` (one `subset/file` per line). This is
how a part of sr-natural packed for a machine that cannot hold all of it (bench/gpu_data.py) keeps
exactly the 30 validation photographs of the whole set, which the index rule would not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from trainer.data import DatasetNotFound, _fingerprint, _locked, _write_tensors, default_cache_dir, epoch_order
from upgrader.architectures import OUTPUT_SIZE

log = logging.getLogger(__name__)

SUBSETS = {"bsd200": (".png",), "yang91": (".bmp", ".png")}
# Held out for validation: file index i (sorted) with i % every == 0 and i < every * count.
VALIDATION = {"bsd200": (10, 20), "yang91": (9, 10)}
VALIDATION_LIST = "validation.txt"  # optional, in the folder: the held-out files by name, instead of the rule above
CROP = OUTPUT_SIZE


@dataclass(frozen=True, eq=False)
class NaturalData:
    """Decoded photographs (uint8 3 x H x W each), split into training images and fixed validation tiles."""

    name: str
    fingerprint: str  # sha256 of relative paths and sizes of every file, as for CIFAR-10
    train_images: list[torch.Tensor]
    train_files: list[str]
    val_files: list[str]
    val: torch.Tensor  # uint8 N x 3 x 32 x 32: every grid tile of the validation images
    _weights: torch.Tensor = field(repr=False, default=None)  # crop positions per training image

    def crops(self, count: int, *, epoch: int, seed: int) -> torch.Tensor:
        """`count` random 32x32 crops of the training photographs, uint8 N x 3 x 32 x 32, drawn from (seed, epoch) alone.

        Images are picked in proportion to their number of crop positions, so every position of every
        photograph is equally likely; every rank and every resumed run draws the same crops.
        """
        mixed = int(np.random.SeedSequence([seed, epoch, 0x6E61]).generate_state(1, np.uint64)[0])
        rng = np.random.default_rng(mixed)
        picks = rng.choice(len(self.train_images), size=count, p=self._weights.numpy())
        out = torch.empty(count, 3, CROP, CROP, dtype=torch.uint8)
        for i, pick in enumerate(picks.tolist()):
            image = self.train_images[pick]
            top = int(rng.integers(image.shape[1] - CROP + 1))
            left = int(rng.integers(image.shape[2] - CROP + 1))
            out[i] = image[:, top : top + CROP, left : left + CROP]
        return out

    def describe(self) -> dict:
        """What the manifest records about this data (its lineage)."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "train_images": len(self.train_images),
            "val_images": len(self.val_files),
            "val_crops": len(self.val),
            "val_files": self.val_files,
        }


def is_validation(subset: str, index: int) -> bool:
    every, count = VALIDATION.get(subset, (0, 0))
    return every > 0 and index % every == 0 and index < every * count


def _list_files(root: Path) -> dict[str, list[str]]:
    files = {}
    for subset, extensions in SUBSETS.items():
        directory = root / subset
        if not directory.is_dir():
            raise DatasetNotFound(f"natural data directory {root} lacks {subset}/ (expected {', '.join(SUBSETS)}/ with images)")
        names = sorted(name for name in os.listdir(directory) if name.lower().endswith(extensions))
        if not names:
            raise DatasetNotFound(f"{directory} holds no images ({', '.join(extensions)})")
        files[subset] = [f"{subset}/{name}" for name in names]
    return files


def _validation_list(root: Path, relative: list[str]) -> set[str] | None:
    """The held-out files named in `root/validation.txt`, each checked to be there; None without that file."""
    listing = root / VALIDATION_LIST
    if not listing.is_file():
        return None
    named = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    if missing := sorted(named - set(relative)):
        raise DatasetNotFound(f"{listing} names {len(missing)} file(s) that are not images here, e.g. {missing[0]}")
    if not named:
        raise DatasetNotFound(f"{listing} names no files: a validation set is needed")
    return named


def _decode(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.array(image.convert("RGB"))
    if min(pixels.shape[:2]) < CROP:
        raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}; natural images must be at least {CROP}x{CROP}")
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _grid_tiles(image: torch.Tensor) -> torch.Tensor:
    """Every non-overlapping 32x32 tile of an image on a grid from its top-left corner."""
    tiles = image.unfold(1, CROP, CROP).unfold(2, CROP, CROP)  # 3 x rows x cols x 32 x 32
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, CROP, CROP)


def load_natural_data(root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> NaturalData:
    """Decode (or read from the cache) every photograph under `root` and split off the validation tiles."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetNotFound(f"natural data directory {root} does not exist (expected {', '.join(SUBSETS)}/ of photographs)")
    files = _list_files(root)
    relative = [path for subset in SUBSETS for path in files[subset]]
    fingerprint = _fingerprint([(path, (root / path).stat().st_size) for path in relative])
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = f"{root.name}-{fingerprint}"
    path = cache_dir / f"{key}.safetensors"
    with _locked(cache_dir / f".{key}.lock"):
        images = _read_cache(path, len(relative))
        if images is None:
            log.info("event=dataset_cache_miss dataset=%s images=%d path=%s", root.name, len(relative), path)
            images = [_decode(root / name) for name in tqdm(relative, desc=f"decoding {root.name}", unit="img", disable=not progress)]
            _write_tensors(path, {f"{i:05d}": image for i, image in enumerate(images)})
        else:
            log.info("event=dataset_cache_hit dataset=%s images=%d path=%s", root.name, len(images), path)
    held_out = _validation_list(root, relative)
    train_images, train_files, val_files, val_tiles = [], [], [], []
    for name, image in zip(relative, images):
        subset, _ = name.split("/", 1)
        if name in held_out if held_out is not None else is_validation(subset, files[subset].index(name)):
            val_files.append(name)
            val_tiles.append(_grid_tiles(image))
        else:
            train_files.append(name)
            train_images.append(image)
    positions = torch.tensor([(im.shape[1] - CROP + 1) * (im.shape[2] - CROP + 1) for im in train_images], dtype=torch.float64)
    return NaturalData(root.name, fingerprint, train_images, train_files, val_files, torch.cat(val_tiles).contiguous(),
                       positions / positions.sum())


def _read_cache(path: Path, expected: int) -> list[torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        log.warning("event=dataset_cache_unreadable path=%s error=%r action=rebuild", path, str(exc))
        return None
    if len(tensors) != expected:
        return None
    return [tensors[key] for key in sorted(tensors)]


def epoch_images(train: torch.Tensor, natural: NaturalData | None, share: float, *, epoch: int, seed: int,
                 size: int | None = None) -> torch.Tensor:
    """The training images of one epoch: `size` of them (default: as many as `train` holds), a `share` natural crops.

    With share 0 and the default size this is `train` itself. Otherwise the CIFAR part is a fresh
    seeded subset of `train` every epoch (all of it over a few epochs) and the natural part fresh
    random crops; with share 1 the epoch is crops alone. The trainer's batches shuffle the two together.
    """
    size = len(train) if size is None else size
    if (natural is None or share == 0) and size == len(train):
        return train
    natural_count = round(share * size) if natural is not None else 0
    data_count = size - natural_count
    if data_count > len(train):
        raise ValueError(f"an epoch of {size} images with natural share {share} needs {data_count} training images of --data, "
                         f"which has {len(train)}: lower --epoch-size or raise --natural-share")
    parts = []
    if data_count:
        # seed + 1: an order unrelated to the one `batches` then shuffles this epoch with
        chosen = epoch_order(len(train), shuffle=True, epoch=epoch, seed=seed + 1)[:data_count]
        parts.append(train.index_select(0, chosen.to(train.device)))
    if natural_count:
        parts.append(natural.crops(natural_count, epoch=epoch, seed=seed).to(train.device))
    return torch.cat(parts)
