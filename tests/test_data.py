"""The trainer's data layer on real CIFAR-10 images: decoding, cache, subsets, batches, shards, errors."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import datasets, transforms

from trainer.data import (
    CACHE_ENV,
    CIFAR_DIR,
    DatasetNotFound,
    batches,
    epoch_order,
    load_image_data,
    place_on_device,
    stratified_subset,
)
from upgrader.imaging import downsample, to_float


@pytest.fixture()
def small_tree(tmp_path, data_dir):
    """An ImageFolder tree of real CIFAR-10 JPEG bytes: 3 classes, 4 train + 2 test images each, plus a BMP copy."""
    root = tmp_path / "tiny-cifar"
    for split, count in (("train", 4), ("test", 2)):
        for class_dir in sorted((data_dir / split).iterdir())[:3]:
            (root / split / class_dir.name).mkdir(parents=True)
            for source in sorted(class_dir.glob("*.jpg"))[:count]:
                shutil.copy(source, root / split / class_dir.name / source.name)
    first_class = sorted((root / "train").iterdir())[0]
    with Image.open(sorted(first_class.glob("*.jpg"))[0]) as image:  # any ImageFolder extension is an image
        image.save(first_class / "zz-bitmap.bmp")
    return root


def pil_tensor(image: Image.Image) -> torch.Tensor:
    return transforms.functional.pil_to_tensor(image.convert("RGB"))


def test_downsample_of_batches_matches_torchvision_resize_on_pil(real_images):
    """The trainer's 8x8 inputs (batches + downsample) against the article's Resize(8) + ToTensor on PIL images."""
    pil_resize = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])
    reference = torch.stack([pil_resize(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in real_images])
    targets = next(batches(real_images, len(real_images), "cpu", shuffle=False))
    difference = (downsample(targets) - reference).abs()
    assert difference.mean() < 1 / 255, f"mean |diff| = {difference.mean() * 255:.3f}/255"


def test_imagefolder_tree_decodes_exactly_like_torchvision_imagefolder(small_tree, tmp_path):
    data = load_image_data(small_tree, cache_dir=tmp_path / "cache", progress=False)
    assert data.name == "tiny-cifar" and len(data.fingerprint) == 64
    for images, labels, split in ((data.train, data.train_labels, "train"), (data.val, data.val_labels, "test")):
        reference = datasets.ImageFolder(small_tree / split)
        assert data.classes == reference.classes
        assert images.dtype == torch.uint8 and images.is_contiguous() and images.shape[1:] == (3, 32, 32)
        assert torch.equal(images, torch.stack([pil_tensor(image) for image, _ in reference]))
        assert labels.tolist() == reference.targets
    assert len(data.train) == 13 and len(data.val) == 6


def test_second_load_reads_the_cache(small_tree, tmp_path):
    cache = tmp_path / "cache"
    first = load_image_data(small_tree, cache_dir=cache, progress=False)
    [train_file] = cache.glob("*-train.safetensors")
    # Replace the cached pixels: a second load that returns them has read the cache, not the JPEGs.
    save_file({"images": 255 - first.train, "labels": first.train_labels}, train_file)
    second = load_image_data(small_tree, cache_dir=cache, progress=False)
    assert torch.equal(second.train, 255 - first.train)
    assert torch.equal(second.val, first.val) and second.fingerprint == first.fingerprint
    assert not list(cache.glob("*.tmp")), "temporary files must be renamed or removed"


def test_damaged_cache_file_is_rebuilt(small_tree, tmp_path):
    cache = tmp_path / "cache"
    first = load_image_data(small_tree, cache_dir=cache, progress=False)
    [train_file] = cache.glob("*-train.safetensors")
    train_file.write_bytes(train_file.read_bytes()[:1000])  # e.g. a disk that filled up under an older writer
    assert torch.equal(load_image_data(small_tree, cache_dir=cache, progress=False).train, first.train)
    assert torch.equal(load_file(train_file)["images"], first.train)


def test_cache_is_keyed_by_the_file_list(small_tree, tmp_path):
    cache = tmp_path / "cache"
    before = load_image_data(small_tree, cache_dir=cache, progress=False)
    class_dir = sorted((small_tree / "train").iterdir())[-1]
    shutil.copy(sorted(class_dir.glob("*.jpg"))[0], class_dir / "9999.jpg")
    after = load_image_data(small_tree, cache_dir=cache, progress=False)
    assert after.fingerprint != before.fingerprint
    assert len(after.train) == len(before.train) + 1
    assert torch.equal(after.train[-1], before.train[len(before.train) - 4])  # the copy of the last class's first image
    assert len(list(cache.glob("*.safetensors"))) == 4  # both splits, both fingerprints


def test_cache_dir_defaults_to_the_environment(small_tree, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from-env"))
    load_image_data(small_tree, progress=False)
    assert len(list((tmp_path / "from-env").glob("*.safetensors"))) == 2


def test_limits_are_seeded_stratified_and_reproducible(data_dir, tmp_path):
    first = load_image_data(data_dir, cache_dir=tmp_path / "a", limit_train=40, limit_val=20, seed=0, progress=False)
    # A fresh cache forces a second decode: the subset comes from the seed, not from the cache.
    again = load_image_data(data_dir, cache_dir=tmp_path / "b", limit_train=40, limit_val=20, seed=0, progress=False)
    other = load_image_data(data_dir, cache_dir=tmp_path / "b", limit_train=40, limit_val=20, seed=1, progress=False)
    assert (len(first.train), len(first.val)) == (40, 20)
    assert len(first.classes) == 10
    assert first.train_labels.bincount().tolist() == [4] * 10 and first.val_labels.bincount().tolist() == [2] * 10
    assert torch.equal(first.train, again.train) and torch.equal(first.val, again.val)
    assert not torch.equal(first.train, other.train)
    assert first.fingerprint == other.fingerprint  # the dataset's identity, whatever the subset


def test_stratified_subset_shares_out_unbalanced_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    chosen = stratified_subset(labels, 20, seed=5)
    assert torch.equal(chosen, chosen.unique())  # sorted, no repeats
    assert labels[chosen].bincount().tolist() == [9, 8, 3]  # class 2 runs out; the others share the rest
    assert torch.equal(chosen, stratified_subset(labels, 20, seed=5))
    assert torch.equal(stratified_subset(labels, 500, seed=5), torch.arange(len(labels)))
    with pytest.raises(ValueError, match="positive"):
        stratified_subset(labels, 0, seed=5)


def test_batches_are_float_targets_in_epoch_order(real_images):
    out = list(batches(real_images, 10, torch.device("cpu"), shuffle=True, epoch=3, seed=7))
    assert [len(batch) for batch in out] == [10] * 6 + [4]
    assert all(batch.dtype == torch.float32 and batch.device.type == "cpu" for batch in out)
    joined = torch.cat(out)
    assert joined.min() >= 0 and joined.max() <= 1
    order = epoch_order(len(real_images), shuffle=True, epoch=3, seed=7)
    assert torch.equal(order.sort().values, torch.arange(len(real_images)))
    assert torch.equal(joined, to_float(real_images[order]))


def test_batch_order_depends_only_on_seed_and_epoch(real_images):
    def order(**kwargs):
        return torch.cat(list(batches(real_images, 16, "cpu", **kwargs)))

    assert torch.equal(order(shuffle=True, epoch=1, seed=0), order(shuffle=True, epoch=1, seed=0))
    assert not torch.equal(order(shuffle=True, epoch=1, seed=0), order(shuffle=True, epoch=2, seed=0))
    assert not torch.equal(order(shuffle=True, epoch=1, seed=0), order(shuffle=True, epoch=1, seed=1))
    assert torch.equal(order(shuffle=False, epoch=5, seed=3), to_float(real_images))


def _ids_per_rank(images, world_size, **kwargs) -> list[list[int]]:
    """Each image holds its own index in every pixel, so a batch says which images it carries."""
    return [
        [int(round(v)) for batch in batches(images, 8, "cpu", rank=rank, world_size=world_size, **kwargs)
         for v in (batch[:, 0, 0, 0] * 255).tolist()]
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(world_size):
    n = 103
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    order = epoch_order(n, shuffle=True, epoch=2, seed=11).tolist()

    shards = _ids_per_rank(images, world_size, shuffle=True, epoch=2, seed=11)
    assert {len(shard) for shard in shards} == {n // world_size}  # same number of steps on every rank
    taken = [i for shard in shards for i in shard]
    assert len(set(taken)) == len(taken)
    assert set(taken) == set(order[: n - n % world_size])  # only the epoch's last n % world_size are left out

    shards = _ids_per_rank(images, world_size, shuffle=True, epoch=2, seed=11, even_shards=False)
    assert sorted(i for shard in shards for i in shard) == list(range(n))  # evaluation: each image exactly once


def test_missing_or_empty_data_dir_says_where_and_how_to_get_cifar10(tmp_path):
    for root, reason in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "holds no dataset")):
        with pytest.raises(DatasetNotFound) as error:
            load_image_data(root, cache_dir=tmp_path / "cache", progress=False)
        message = str(error.value)
        assert str(root) in message and reason in message
        assert "CIFAR-10" in message and "--download" in message and "train/<class>" in message
    assert issubclass(DatasetNotFound, FileNotFoundError)


def test_empty_class_directory_is_named(small_tree, tmp_path):
    (small_tree / "train" / "unicorn").mkdir()
    (small_tree / "test" / "unicorn").mkdir()
    with pytest.raises(DatasetNotFound, match="unicorn holds no images"):
        load_image_data(small_tree, cache_dir=tmp_path / "cache", progress=False)


def test_image_of_the_wrong_size_is_named(small_tree, tmp_path):
    big = sorted((small_tree / "test").iterdir())[0] / "big.png"
    Image.new("RGB", (64, 48)).save(big)
    with pytest.raises(ValueError, match=r"big\.png is 64x48"):
        load_image_data(small_tree, cache_dir=tmp_path / "cache", progress=False)


def _write_cifar_batches(directory, images: torch.Tensor, labels: list[int]) -> None:
    """The torchvision CIFAR-10 layout, pickled with protocol 2 like the original Python 2 files."""
    directory.mkdir(parents=True)
    rows = images.flatten(1).numpy()
    splits = {f"data_batch_{i}": slice(8 * (i - 1), 8 * i) for i in range(1, 6)} | {"test_batch": slice(40, 64)}
    for name, part in splits.items():
        batch = {"batch_label": name, "labels": labels[part], "data": rows[part], "filenames": [f"{name}.png"]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(8)], "num_cases_per_batch": 8, "num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_torchvision_cifar10_directory(real_images, tmp_path):
    labels = [i // 8 for i in range(64)]  # real_images: 8 images from each of 8 classes
    _write_cifar_batches(tmp_path / "data" / CIFAR_DIR, real_images, labels)
    for root in (tmp_path / "data", tmp_path / "data" / CIFAR_DIR):
        data = load_image_data(root, cache_dir=tmp_path / "cache", progress=False)
        assert data.name == "cifar10" and data.classes == [f"class{i}" for i in range(8)]
        assert torch.equal(data.train, real_images[:40]) and torch.equal(data.val, real_images[40:])
        assert data.train_labels.tolist() == labels[:40]
    assert load_file(next((tmp_path / "cache").glob("*-test.safetensors")))["images"].shape == (24, 3, 32, 32)
    # Asked to download, but CIFAR-10 is already there: nothing is fetched (this machine has no internet).
    assert torch.equal(load_image_data(tmp_path / "data", download=True, cache_dir=tmp_path / "cache").val, real_images[40:])


class _RunsCode:
    def __reduce__(self):
        return os.getpid, ()


def test_cifar_batch_that_would_run_code_is_refused(real_images, tmp_path):
    directory = tmp_path / CIFAR_DIR
    _write_cifar_batches(directory, real_images, [i // 8 for i in range(64)])
    (directory / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode()}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch is not a valid CIFAR-10 batch file: refusing to load \w+\.getpid"):
        load_image_data(directory, cache_dir=tmp_path / "cache", progress=False)


def test_place_on_device_keeps_cpu_data_as_is(real_images):
    placed = place_on_device(real_images, "cpu")
    assert placed.device.type == "cpu" and torch.equal(placed, real_images)
