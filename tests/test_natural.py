"""Natural-photograph data: the fixed held-out set, random crops, the mix with CIFAR-10, and what the
trainer publishes about it (natural metrics next to CIFAR-10's, the lineage), plus the time-spanning LR schedule.

The photographs here are written as real PNG and BMP files whose pixels encode where they are
(red = image number, green = row, blue = column), so every crop tells which image and which
position it was cut from.
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from trainer.natural import CROP, epoch_images, load_natural_data
from trainer.train import evaluate, main

BSD, YANG = 12, 10  # files in bsd200/ and yang91/
LIMIT_TRAIN, LIMIT_VAL = 256, 64


def coded_image(number: int, height: int, width: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([np.full_like(rows, number * 10), rows, cols], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def natural_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sr-natural")
    (root / "bsd200").mkdir()
    (root / "yang91").mkdir()
    for i in range(BSD):  # 64 x 96 (and a transposed one), like BSDS300's portrait and landscape images
        Image.fromarray(coded_image(i, *((96, 64) if i == 3 else (64, 96)))).save(root / "bsd200" / f"img{i:02d}.png")
    for i in range(YANG):  # small, odd sizes, like T91
        Image.fromarray(coded_image(BSD + i, 40 + i, 70 - i)).save(root / "yang91" / f"t{i}.bmp")
    (root / "yang91" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def natural(natural_dir, tmp_path_factory):
    return load_natural_data(natural_dir, cache_dir=tmp_path_factory.mktemp("natural-cache"), progress=False)


def test_the_validation_images_are_fixed_and_tiled_on_a_grid(natural):
    # every 10th of bsd200 and every 9th of yang91 (in sorted order), up to 20 and 10 of them
    assert natural.val_files == ["bsd200/img00.png", "bsd200/img10.png", "yang91/t0.bmp", "yang91/t9.bmp"]
    assert len(natural.train_images) == BSD + YANG - 4
    tiles = 2 * (2 * 3) + (40 // CROP) * (70 // CROP) + (49 // CROP) * (61 // CROP)
    assert natural.val.shape == (tiles, 3, CROP, CROP) and natural.val.dtype == torch.uint8
    first = natural.val[1]  # image 0, second tile of the first row
    assert (first[0] == 0).all() and first[1, :, 0].tolist() == list(range(32)) and first[2, 0, :].tolist() == list(range(32, 64))
    described = natural.describe()
    assert described["val_files"] == natural.val_files and described["val_crops"] == tiles and len(described["fingerprint"]) == 64


def test_crops_come_only_from_training_images_and_are_seeded_per_epoch(natural):
    crops = natural.crops(600, epoch=1, seed=0)
    assert crops.shape == (600, 3, CROP, CROP) and crops.dtype == torch.uint8
    assert torch.equal(crops, natural.crops(600, epoch=1, seed=0))
    assert not torch.equal(crops, natural.crops(600, epoch=2, seed=0))
    assert not torch.equal(crops, natural.crops(600, epoch=1, seed=1))
    val_numbers = {0, 10, BSD + 0, BSD + 9}
    seen = set()
    for crop in crops:
        number = int(crop[0, 0, 0]) // 10
        assert (crop[0] == number * 10).all() and number not in val_numbers
        top, left = int(crop[1, 0, 0]), int(crop[2, 0, 0])
        # a contiguous window: rows and columns count up by one from its corner
        assert crop[1, :, 0].tolist() == list(range(top, top + CROP))
        assert crop[2, 0, :].tolist() == list(range(left, left + CROP))
        seen.add(number)
    assert seen == set(range(BSD + YANG)) - val_numbers  # 600 crops reach every training image


def test_decoded_once_then_read_from_the_cache(natural_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = load_natural_data(natural_dir, cache_dir=tmp_path, progress=False)
    assert "event=dataset_cache_miss" in caplog.text
    caplog.clear()
    second = load_natural_data(natural_dir, cache_dir=tmp_path, progress=False)
    assert "event=dataset_cache_hit" in caplog.text and "cache_miss" not in caplog.text
    assert second.fingerprint == first.fingerprint and torch.equal(second.val, first.val)
    assert all(torch.equal(a, b) for a, b in zip(first.train_images, second.train_images))


def test_a_missing_or_empty_natural_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_natural_data(tmp_path / "nope", cache_dir=tmp_path)
    (tmp_path / "bsd200").mkdir()
    (tmp_path / "yang91").mkdir()
    with pytest.raises(FileNotFoundError, match="bsd200 holds no images"):
        load_natural_data(tmp_path, cache_dir=tmp_path)


def test_epoch_images_mix_cifar_and_natural_crops_in_the_chosen_share(natural, real_images):
    assert epoch_images(real_images, natural, 0.0, epoch=1, seed=0) is real_images
    mixed = epoch_images(real_images, natural, 0.25, epoch=1, seed=0)
    assert len(mixed) == len(real_images)
    from_cifar = [any(torch.equal(image, row) for row in real_images) for image in mixed]
    assert sum(from_cifar) == 48 and from_cifar[:48] == [True] * 48  # the CIFAR part first; `batches` shuffles
    assert len({image.numpy().tobytes() for image in mixed[:48]}) == 48  # a subset: no image twice
    assert not torch.equal(mixed[:48], epoch_images(real_images, natural, 0.25, epoch=2, seed=0)[:48])
    alone = epoch_images(real_images, natural, 1.0, epoch=1, seed=0, size=100)
    assert len(alone) == 100 and torch.equal(alone, natural.crops(100, epoch=1, seed=0))
    with pytest.raises(ValueError, match="needs 96 training images of --data, which has 64"):
        epoch_images(real_images, natural, 0.25, epoch=1, seed=0, size=128)


@pytest.mark.slow
def test_trainer_mixes_natural_data_and_publishes_both_validations(data_dir, natural_dir, natural, tmp_path, real_images):
    store = tmp_path / "store"
    args = ["--data", str(data_dir), "--store", str(store), "--cache-dir", str(tmp_path / "cache"), "--limit-train", str(LIMIT_TRAIN),
            "--limit-val", str(LIMIT_VAL), "--no-progress", "--models", "subpixel_residual", "--arch-params", '{"width": 8, "depth": 1}',
            "--natural", str(natural_dir), "--natural-share", "0.5", "--epochs", "2", "--epoch-size", "128", "--epoch-val", "32"]
    assert main(args) == 0
    model, manifest = ModelStore(store).load("subpixel_residual")
    natural_metrics = manifest["metrics"]["natural"]
    assert set(natural_metrics) == {"model", "bicubic", "self_ensemble", "images"} and natural_metrics["images"] == len(natural.val)
    # the published numbers are what the stored weights give on the held-out tiles
    measured = evaluate(model, natural.val, torch.device("cpu"), loss_name="mse", baseline=True, ensemble=True)
    measured.pop("loss")
    assert measured == natural_metrics
    assert manifest["metrics"]["model"]["psnr"] != natural_metrics["model"]["psnr"]  # CIFAR-10's are next to them
    dataset = manifest["dataset"]
    assert dataset["natural"]["fingerprint"] == natural.fingerprint and dataset["natural"]["val_files"] == natural.val_files
    assert dataset["mix"] == {"cifar10-jpeg": 0.5, natural_dir.name: 0.5}
    assert [h["epoch"] for h in manifest["history"]] == [1, 2] and all("val_natural_psnr" in h for h in manifest["history"])
    assert manifest["recipe"]["schedule_over"] == "epochs"


@pytest.mark.slow
def test_schedule_over_time_anneals_within_the_time_budget(data_dir, tmp_path):
    args = ["--data", str(data_dir), "--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"),
            "--limit-train", str(LIMIT_TRAIN), "--limit-val", str(LIMIT_VAL), "--no-progress", "--models", "subpixel_residual",
            "--arch-params", '{"width": 8, "depth": 1}', "--lr-schedule", "cosine", "--epochs", "5", "--no-ensemble-metrics"]
    # 0.00001 minutes (0.6 ms) is spent by the first step: the cosine then sits at 0, and no second epoch fits
    assert main([*args, "--schedule-over", "time", "--max-minutes", "0.00001"]) == 0
    timed = ModelStore(tmp_path / "store").manifest("subpixel_residual")
    assert timed["epochs_completed"] == 1 and timed["history"][0]["lr"] == 0.0 and timed["recipe"]["schedule_over"] == "time"
    assert "self_ensemble" not in timed["metrics"]
    # over epochs, the first epoch of the same run ends early in its cosine, the learning rate still high
    assert main([*args, "--epochs", "5", "--max-minutes", "10"]) == 0
    stepped = ModelStore(tmp_path / "store").manifest("subpixel_residual")
    assert stepped["epochs_completed"] == 5 and stepped["history"][0]["lr"] > 0.0


@pytest.mark.parametrize("argv,message", [
    (["--natural-share", "0.5"], "--natural-share needs --natural DIR"),
    (["--natural", "x", "--natural-share", "1.5"], "--natural-share 1.5 is out of range"),
    (["--schedule-over", "time"], "--schedule-over time needs --max-minutes"),
    (["--epoch-size", "0"], "--epoch-size 0 is out of range"),
])
def test_cli_rejects_bad_natural_and_schedule_flags(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("UPGRADER_NATURAL_DATA", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_folder_may_name_its_held_out_files(natural_dir, tmp_path):
    """validation.txt replaces the index rule: exactly the named files are held out, and a name that is not there is refused."""
    import shutil

    root = tmp_path / "named"
    shutil.copytree(natural_dir, root)
    (root / "validation.txt").write_text("bsd200/img03.png\n\nyang91/t4.bmp\n")
    named = load_natural_data(root, cache_dir=tmp_path / "cache", progress=False)
    assert named.val_files == ["bsd200/img03.png", "yang91/t4.bmp"]
    assert len(named.train_files) == BSD + YANG - 2 and not set(named.train_files) & set(named.val_files)
    assert named.val[:, 0].unique().tolist() == [30, (BSD + 4) * 10]  # red = image number * 10: only those two images' tiles
    (root / "validation.txt").write_text("bsd200/img03.png\nbsd200/gone.png\n")
    with pytest.raises(FileNotFoundError, match="names 1 file.*bsd200/gone.png"):
        load_natural_data(root, cache_dir=tmp_path / "cache", progress=False)


def test_data_packed_for_a_gpu_keeps_the_whole_sets_validation_within_its_budget(data_dir, tmp_path):
    """bench/gpu_data.py: the 30 held-out photographs of all of sr-natural, losslessly, named for the trainer; all of
    CIFAR-10's test split; equal training images per class; the bytes within the budget."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_data
    from trainer.natural import SUBSETS, is_validation

    source = data_dir.parent / "sr-natural"
    if not (source / "bsd200").is_dir():
        pytest.fail(f"sr-natural not found at {source}")
    out = tmp_path / "packed"
    version = tmp_path / "store" / "sr" / "3"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    pack = tmp_path / "pack" / "gpudata.tgz"
    packed = gpu_data.main(["--out", str(out), "--budget-mb", "20", "--natural-share-mb", "8", "--cifar", str(data_dir), "--natural", str(source),
                            "--pack", str(pack), "--init", str(version)])
    expected = []
    for subset, extensions in SUBSETS.items():
        names = sorted(p.name for p in (source / subset).iterdir() if p.name.lower().endswith(extensions))
        expected += [f"{subset}/{Path(n).stem}.png" for i, n in enumerate(names) if is_validation(subset, i)]
    natural = load_natural_data(out / "natural", cache_dir=tmp_path / "cache", progress=False)
    assert natural.val_files == expected and len(expected) == 30
    assert 0 < len(natural.train_files) == packed["natural"]["training_images"]
    bmp = next(n for n in expected if n.startswith("yang91/"))
    original = next((source / "yang91").glob(Path(bmp).stem + ".*"))
    assert np.array_equal(np.asarray(Image.open(original).convert("RGB")), np.asarray(Image.open(out / "natural" / bmp)))  # lossless
    counts = {c.name: len(list(c.iterdir())) for c in (out / "cifar" / "train").iterdir()}
    assert len(counts) == 10 and len(set(counts.values())) == 1 and packed["cifar"]["train_per_class"] > 0
    assert sum(1 for f in (out / "cifar" / "test").rglob("*.jpg")) == packed["cifar"]["test_images"] == 10_000
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix != ".json" and f.name != "validation.txt")
    assert on_disk == packed["bytes"] <= 20e6
    assert packed["init"] == "sr:3" and (out / "init" / "sr" / "3" / "manifest.json").is_file()
    # what travels is one archive, smaller than its files (near-identical JPEG headers), holding every one of them
    with tarfile.open(pack) as archive:
        names = {m.name for m in archive.getmembers() if m.isfile()}
    assert names == {f"packed/{f.relative_to(out).as_posix()}" for f in out.rglob("*") if f.is_file()}
    assert packed["pack"]["bytes"] == pack.stat().st_size < 0.8 * packed["bytes"]
