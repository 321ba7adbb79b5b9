"""The trainer's data: decode a dataset once, cache it as uint8 tensors, serve float batches from memory.

The reference pipeline (two DataLoaders over torchvision ImageFolders with PIL transforms) opens and
decodes every JPEG twice per epoch and resizes images one at a time. CIFAR-10 is only 180 MB as
uint8, so here it is decoded once, cached on disk, kept whole in (device) memory, and an epoch is a
permutation plus `index_select`; the 8x8 inputs are made per batch on the device by the trainer.

Two sources are understood:

    ImageFolder tree    <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg (any torchvision
                        ImageFolder extension), e.g. ../shared/datasets/cifar10-jpeg
    torchvision CIFAR-10  <root>/cifar-10-batches-py/ or that directory itself (data_batch_1..5,
                        test_batch, batches.meta); `download=True` fetches it through torchvision

The cache is one safetensors file per split (never a pickle), named by the dataset's fingerprint
(relative paths and sizes of its files), so adding, removing or replacing a file makes a new entry.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import io
import logging
import os
import pickle
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import download_and_extract_archive
from tqdm import tqdm

from upgrader.architectures import OUTPUT_SHAPE
from upgrader.cpus import usable_cpus

log = logging.getLogger(__name__)

CACHE_ENV = "UPGRADER_CACHE"
_DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "datasets"
SPLITS = ("train", "test")  # `test` is the validation split, as in CIFAR-10 and the reference article
CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_META = "batches.meta"
# PIL releases the GIL while it decodes, so a few threads overlap reading and decoding; 32x32 images
# are too small for more to help (measured: ~4-6k images/s on 2 cores, once per dataset).
_DECODE_THREADS = min(4, usable_cpus())
# Share of free GPU memory the dataset may take: the rest is for the model, optimizer state and activations.
DEVICE_MEMORY_FRACTION = 0.5

HOW_TO_GET_CIFAR10 = (
    "expected an ImageFolder tree with train/<class>/*.jpg and test/<class>/*.jpg (like ../shared/datasets/cifar10-jpeg) "
    f"or a torchvision CIFAR-10 directory ({CIFAR_DIR}); to fetch CIFAR-10 (needs internet) run the trainer with "
    "--download, i.e. load_image_data(root, download=True)"
)


class DatasetNotFound(FileNotFoundError):
    """The data directory is missing, empty, or holds neither an ImageFolder tree nor CIFAR-10 batches."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class ImageData:
    """Both splits of a dataset, decoded: uint8 N x 3 x 32 x 32 CPU tensors and their class indices."""

    name: str  # the ImageFolder directory's name, or "cifar10" for torchvision batches
    fingerprint: str  # sha256 of the source's relative file paths and sizes: identifies the data in manifests
    train: torch.Tensor
    val: torch.Tensor  # the `test` split
    classes: list[str]
    train_labels: torch.Tensor  # int64 index into `classes`, one per image
    val_labels: torch.Tensor


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or _DEFAULT_CACHE_DIR)


def load_image_data(
    root: str | os.PathLike,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_val: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ImageData:
    """Load both splits of the dataset at `root`, decoding only on a cache miss.

    `limit_train` / `limit_val` keep a fixed subset of that many images of a split, chosen by
    `stratified_subset` from `seed`: the same images on every run and every rank, all classes in
    equal shares. Nothing is downloaded unless `download` is set.
    """
    root = Path(root).expanduser().resolve()
    if download:
        _download_cifar10(root)
    source = _open_source(root)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaded = {
        split: _load_split(source, split, limit, seed, cache_dir, progress)
        for split, limit in zip(SPLITS, (limit_train, limit_val))
    }
    (train, train_labels), (val, val_labels) = loaded["train"], loaded["test"]
    return ImageData(source.name, source.fingerprint, train, val, source.classes, train_labels, val_labels)


def _download_cifar10(root: Path) -> None:
    """Fetch and extract CIFAR-10 into root/cifar-10-batches-py unless it is there.

    torchvision's URL, file name and md5 are used, but not its CIFAR10 class, which would
    unpickle the batches without restrictions; `_CifarBatchesSource` reads them.
    """
    target = root.parent if root.name == CIFAR_DIR else root
    if (target / CIFAR_DIR / _CIFAR_META).is_file():
        return
    log.info("event=download dataset=cifar10 url=%s into=%s", CIFAR10.url, target)
    try:
        download_and_extract_archive(CIFAR10.url, str(target), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except OSError as exc:  # URLError and friends: name what failed and where
        raise DatasetNotFound(f"could not download CIFAR-10 from {CIFAR10.url} into {target}: {exc}") from exc


def _open_source(root: Path) -> _ImageFolderSource | _CifarBatchesSource:
    if (root / _CIFAR_META).is_file():
        return _CifarBatchesSource(root)
    if (root / CIFAR_DIR / _CIFAR_META).is_file():
        return _CifarBatchesSource(root / CIFAR_DIR)
    if all((root / split).is_dir() for split in SPLITS):
        return _ImageFolderSource(root)
    what = "does not exist" if not root.exists() else "holds no dataset"
    raise DatasetNotFound(f"data directory {root} {what}: {HOW_TO_GET_CIFAR10}")


def _fingerprint(entries: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for relative_path, size in entries:
        digest.update(f"{relative_path}\t{size}\n".encode())
    return digest.hexdigest()


class _ImageFolderSource:
    """root/{train,test}/<class>/**/<image>, listed in torchvision ImageFolder's order (sorted classes, sorted walk).

    Same order as ImageFolder, so "the first N images" means the same images in both pipelines.
    Paths are plain strings: pathlib objects made listing 60,000 files take seconds instead of a fraction.
    """

    def __init__(self, root: Path) -> None:
        self.name = root.name
        self.classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
        if not self.classes:
            raise DatasetNotFound(f"{root / 'train'} has no class directories: {HOW_TO_GET_CIFAR10}")
        test_classes = sorted(entry.name for entry in os.scandir(root / "test") if entry.is_dir())
        if test_classes != self.classes:
            raise ValueError(f"{root}: train/ and test/ have different classes: {self.classes} vs {test_classes}")
        self.files: dict[str, list[str]] = {}
        self._labels: dict[str, torch.Tensor] = {}
        entries: list[tuple[str, int]] = []
        for split in SPLITS:
            files, labels = [], []
            for label, class_name in enumerate(self.classes):
                class_files = _image_files(os.path.join(root, split, class_name))
                if not class_files:
                    raise DatasetNotFound(f"{root / split / class_name} holds no images ({', '.join(IMG_EXTENSIONS)})")
                files += class_files
                labels += [label] * len(class_files)
            self.files[split] = files
            self._labels[split] = torch.tensor(labels, dtype=torch.int64)
            prefix = len(str(root)) + 1  # every path is `root` + os.sep + the relative path
            entries += [(path[prefix:].replace(os.sep, "/"), os.stat(path).st_size) for path in files]
        self.fingerprint = _fingerprint(entries)

    def labels(self, split: str) -> torch.Tensor:
        return self._labels[split]

    def decode(self, split: str, indices: torch.Tensor, progress: bool) -> torch.Tensor:
        """Decode the chosen files of a split, in file order, with a progress bar."""
        files = [self.files[split][i] for i in indices.tolist()]
        images = torch.empty(len(files), *OUTPUT_SHAPE, dtype=torch.uint8)
        with ThreadPoolExecutor(_DECODE_THREADS) as pool, tqdm(
            total=len(files), desc=f"decoding {self.name}/{split}", unit="img", disable=not progress
        ) as bar:
            for i, image in enumerate(pool.map(_decode_image, files)):
                images[i] = image
                bar.update()
        return images


def _image_files(class_dir: str) -> list[str]:
    return [
        os.path.join(directory, name)
        for directory, _, names in sorted(os.walk(class_dir, followlinks=True))
        for name in sorted(names)
        if name.lower().endswith(IMG_EXTENSIONS)
    ]


def _decode_image(path: str) -> torch.Tensor:
    """One image file -> uint8 3 x 32 x 32 RGB, decoded by PIL and converted to RGB as ImageFolder's loader does.

    The file is read in one call first: PIL's own small reads made decoding ~2x slower.
    """
    with open(path, "rb") as file, Image.open(io.BytesIO(file.read())) as image:
        pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    if pixels.shape != (OUTPUT_SHAPE[1], OUTPUT_SHAPE[2], OUTPUT_SHAPE[0]):
        height, width = pixels.shape[:2]
        raise ValueError(f"{path} is {width}x{height}; the upgrader trains on {OUTPUT_SHAPE[2]}x{OUTPUT_SHAPE[1]} images")
    return torch.from_numpy(pixels).permute(2, 0, 1)


class _CifarBatchesSource:
    """The python version of CIFAR-10 as torchvision downloads it: pickled dicts of uint8 rows and labels.

    The batch files are pickles by format, so they are read with `_CifarUnpickler`, which rebuilds
    only plain containers and numpy arrays: a tampered file fails instead of running code.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = "cifar10"
        paths = [directory / _CIFAR_META] + [directory / name for names in _CIFAR_FILES.values() for name in names]
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise DatasetNotFound(f"{directory} lacks {', '.join(missing)}: {HOW_TO_GET_CIFAR10}")
        self.classes = list(_read_cifar_pickle(directory / _CIFAR_META)["label_names"])
        self.fingerprint = _fingerprint([(path.name, path.stat().st_size) for path in paths])
        self._read: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's images and labels, read from its batch files on first use (only on a cache miss)."""
        if split not in self._read:
            batches = [_read_cifar_pickle(self.directory / name) for name in _CIFAR_FILES[split]]
            rows = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in batches])
            labels = [label for batch in batches for label in batch["labels"]]
            self._read[split] = torch.from_numpy(rows).view(-1, *OUTPUT_SHAPE), torch.tensor(labels, dtype=torch.int64)
        return self._read[split]

    def labels(self, split: str) -> torch.Tensor:
        return self._split(split)[1]

    def decode(self, split: str, indices: torch.Tensor, progress: bool) -> torch.Tensor:
        return self._split(split)[0][indices].contiguous()


class _CifarUnpickler(pickle.Unpickler):
    # What a CIFAR-10 batch needs besides dicts, lists, strings and ints. `_reconstruct` is taken
    # from an array so that it is found under numpy 1 (numpy.core) and numpy 2 (numpy._core) alike;
    # `_codecs.encode` is how Python 3 writes bytes into a protocol-2 pickle (a re-pickled batch).
    _NUMPY = {"_reconstruct": np.empty(0).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            return self._NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return _CifarUnpickler(file, encoding="latin1").load()  # latin1: the files were written by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid CIFAR-10 batch file: {exc}") from exc


def stratified_subset(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Sorted indices of `limit` items: a seeded shuffle in which the classes take turns.

    Every class gets `limit // classes` items or one more (while it has them), so even a smoke run
    of a few dozen images covers every class; the same seed always picks the same items.
    """
    if limit < 1:
        raise ValueError(f"a split limit must be a positive number of images, got {limit}")
    if limit >= len(labels):
        return torch.arange(len(labels))
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled_labels = labels[shuffled]
    turn = torch.empty_like(shuffled)  # turn[i]: how many of its class come before shuffled[i]
    for label in range(int(labels.max()) + 1):
        members = shuffled_labels == label
        turn[members] = torch.arange(int(members.sum()))
    return shuffled[torch.argsort(turn, stable=True)[:limit]].sort().values


def _load_split(source, split: str, limit: int | None, seed: int, cache_dir: Path, progress: bool):
    key = f"{source.name}-{source.fingerprint}-{split}" + (f"-{limit}-seed{seed}" if limit is not None else "")
    path = cache_dir / f"{key}.safetensors"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One process decodes, the others (DDP ranks, parallel runs) wait and then read its file.
    with _locked(cache_dir / f".{key}.lock"):
        cached = _read_cache(path)
        if cached is not None:
            log.info("event=dataset_cache_hit split=%s images=%d path=%s", split, len(cached[0]), path)
            return cached
        labels = source.labels(split)
        indices = stratified_subset(labels, limit, seed) if limit is not None else torch.arange(len(labels))
        log.info("event=dataset_cache_miss split=%s images=%d path=%s", split, len(indices), path)
        images = source.decode(split, indices, progress)
        _write_cache(path, images, labels[indices])
    return images, labels[indices]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield  # the lock goes with the file descriptor on close


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        return tensors["images"], tensors["labels"]
    except (SafetensorError, KeyError, OSError) as exc:
        log.warning("event=dataset_cache_unreadable path=%s error=%r action=rebuild", path, str(exc))
        return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    _write_tensors(path, {"images": images, "labels": labels})


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write to a temporary file beside `path`, fsync, rename: readers see the whole file or none."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache is as readable as the dataset
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def place_on_device(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Where a split lives while training: whole on the GPU when it fits, else in CPU memory.

    It fits when it takes at most DEVICE_MEMORY_FRACTION of the free GPU memory. A CPU-resident
    split is not pinned here: shuffled batches are gathers, so `batches` gathers each one straight
    into pinned memory and pinning the whole split would only lock host memory for nothing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if images.nbytes <= DEVICE_MEMORY_FRACTION * free_bytes:
            return images.to(device)
        log.info("event=dataset_on_host bytes=%d free_device_bytes=%d", images.nbytes, free_bytes)
    return images.cpu().contiguous()


def epoch_order(num_images: int, *, shuffle: bool, epoch: int = 0, seed: int = 0) -> torch.Tensor:
    """The order of an epoch: a permutation drawn from (seed, epoch) alone, so every rank and every resumed run agrees."""
    if not shuffle:
        return torch.arange(num_images)
    # SeedSequence hashes the pair: (seed, epoch + 1) and (seed + 1, epoch) get unrelated orders, unlike seed + epoch.
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(mixed))


def batches(
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    *,
    shuffle: bool,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    even_shards: bool = True,
) -> Iterator[torch.Tensor]:
    """float32 N x 3 x 32 x 32 targets in [0, 1] on `device`, one batch at a time (the last may be short).

    Under DDP each rank takes the strided shard `order[rank::world_size]` of the same epoch order, as
    DistributedSampler does. With `even_shards` (for training) the `len % world_size` images at the
    end of the order are left out so every rank runs the same number of steps; the shuffle drops
    different ones each epoch. `even_shards=False` (for evaluation, with per-rank sums all-reduced)
    gives every image to exactly one rank.

    uint8 travels and is converted on the device: 4x less to copy than float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    device = torch.device(device)
    order = epoch_order(len(images), shuffle=shuffle, epoch=epoch, seed=seed)
    if even_shards:
        order = order[: len(order) - len(order) % world_size]
    shard = order[rank::world_size].to(images.device)
    stage_in_pinned_memory = device.type == "cuda" and images.device.type == "cpu"
    for start in range(0, len(shard), batch_size):
        index = shard[start : start + batch_size]
        if stage_in_pinned_memory:
            # Pinned blocks come from PyTorch's caching host allocator, which keeps each one until
            # its asynchronous copy has finished, so the next gather never overwrites a copy in flight.
            staged = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
            batch = torch.index_select(images, 0, index, out=staged).to(device, non_blocking=True)
        else:
            batch = images.index_select(0, index).to(device)
        yield batch.float().div_(255.0)
