"""The trainer end to end on real images: tiny real training runs that publish to a real store,
resume after a real kill, the time budget, a 2-process torchrun (gloo) run, the CLI; and the
recipe pieces (schedules, augmentation, EMA, checkpoints) on their own.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model_store import ModelStore
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.data import load_image_data, place_on_device
from trainer.recipe import EMA, LR_SCHEDULES, PSNR_LOSS_FLOOR, dihedral_augment, learning_rate, psnr_loss
from trainer.train import EVALUATION, evaluate, get_args_parser, grow, main
from upgrader.architectures import ARCHITECTURES, build_model, parameter_count
from upgrader.cpus import native_bf16_cpu
from upgrader.imaging import bicubic_upscale, downsample, psnr_per_image

LIMIT_TRAIN, LIMIT_VAL = 256, 64
CONTRACT_KEYS = {
    "architecture", "parameter_count", "input_shape", "output_shape", "recipe", "args", "dataset", "history", "metrics",
    "device", "wall_time_s", "torch_version", "epochs_completed",
    "name", "version", "created_at", "weights_sha256", "files",  # added by the store
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def val_images(data_dir, cache_dir) -> torch.Tensor:
    """The validation images every run below evaluates on (same limits, same seed)."""
    data = load_image_data(data_dir, cache_dir=cache_dir, limit_train=LIMIT_TRAIN, limit_val=LIMIT_VAL, seed=0, progress=False)
    return place_on_device(data.val, torch.device("cpu"))


def cli_args(data_dir: Path, store: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(data_dir), "--store", str(store), "--cache-dir", str(cache_dir), "--limit-train", str(LIMIT_TRAIN),
            "--limit-val", str(LIMIT_VAL), "--no-progress", *extra]


def subprocess_env(cache_dir: Path) -> dict:
    # Same intra-op thread count as this process (other tests may have changed it): float sums
    # are split per thread, and the bit-exact resume comparison runs one side in each process.
    return {**os.environ, "UPGRADER_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


def assert_reproduces_metrics(store: ModelStore, name: str, val_images: torch.Tensor, loss: str = "mse") -> dict:
    """Loaded back from the store, the model scores exactly what its manifest says: same weights, same outputs."""
    model, manifest = store.load(name)
    assert not model.training
    metrics = evaluate(model, val_images, torch.device("cpu"), loss_name=loss, baseline=True, ensemble=True)
    metrics.pop("loss")
    assert metrics == manifest["metrics"]
    return manifest


@pytest.fixture(scope="module")
def tiny_store(data_dir, cache_dir, tmp_path_factory) -> ModelStore:
    """One real 1-epoch training run of fc and conv on 256 real images, published to a fresh store."""
    root = tmp_path_factory.mktemp("tiny-store")
    assert main(cli_args(data_dir, root, cache_dir, "--models", "fc,conv", "--epochs", "1")) == 0
    return ModelStore(root)


def test_evaluation_scores_what_the_service_answers(tmp_path, val_images):
    """`evaluate` (what the trainer publishes) measures as served: its PSNRs are the mean of what POST /upscale and
    POST /bicubic report when sent the images' 8x8 PNGs with the 32x32 originals as references."""
    from test_service_support import LiveServer, multipart, png_list, publish, quantise

    params = {"width": 8, "depth": 1}
    model = build_model("subpixel_residual", **params).eval()  # untrained: its last conv is zero, so bicubic exactly
    with torch.no_grad():
        model.to_subpixels.bias.fill_(0.3 / 255)  # plus a third of an 8-bit level: gone once the PNG is written
    store = ModelStore(tmp_path / "store")
    publish(store, "sr", "subpixel_residual", model=model, params=params)
    # Flat images join the validation images: exact floats score these far below what 8-bit PNGs do.
    images = torch.cat([val_images, torch.arange(4, dtype=torch.uint8).mul(85).view(4, 1, 1, 1).expand(4, 3, 32, 32)])
    measured = evaluate(model, images, torch.device("cpu"), loss_name="mse", baseline=True)
    with torch.inference_mode():
        floats, targets = downsample(images.float() / 255), images.float() / 255
        float_psnr = psnr_per_image(model(floats), targets).mean().item()
    inputs, references = png_list(quantise(floats)), png_list(images)
    with LiveServer(store=store.root) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for route, who, tolerance in [("/upscale?model=sr", "model", 1e-3), ("/bicubic", "bicubic", 0.01)]:  # Pillow's rounding
            response = client.post(route, files=multipart(inputs, references=references))
            assert response.status_code == 200, response.text
            served = np.mean([image["psnr"] for image in response.json()["images"]])
            assert served == pytest.approx(measured[who]["psnr"], abs=tolerance), who
    assert measured["model"]["psnr"] - float_psnr > 1.0  # what exact floats would have published instead


@pytest.mark.slow
def test_tiny_training_publishes_models_that_load_back_and_reproduce(tiny_store, val_images):
    assert tiny_store.models() == ["conv", "fc"]
    for name in ("fc", "conv"):
        assert tiny_store.versions(name) == [1]
        manifest = assert_reproduces_metrics(tiny_store, name, val_images)
        assert manifest["evaluation"] == EVALUATION
        torch.manual_seed(0)  # the trainer's seed: these are the initial weights, which training changed
        initial, trained = build_model(name).state_dict(), tiny_store.load_state_dict(name)[0]
        assert initial.keys() == trained.keys() and not all(torch.equal(initial[k], trained[k]) for k in initial)
        assert manifest["metrics"]["images"] == LIMIT_VAL


@pytest.mark.slow
def test_manifest_follows_the_contract(tiny_store):
    manifest = tiny_store.verify("conv", 1)
    assert CONTRACT_KEYS <= manifest.keys()
    assert manifest["architecture"] == {"name": "conv", "params": {}}
    assert manifest["parameter_count"] == parameter_count(build_model("conv")) == 117_655
    assert manifest["input_shape"] == [3, 8, 8] and manifest["output_shape"] == [3, 32, 32]
    assert manifest["recipe"].items() >= {"optimizer": "adam", "lr": 0.001, "batch_size": 128, "loss": "mse", "epochs": 1,
                                        "lr_schedule": "constant", "augment": "none", "ema": 0.0}.items()
    parser_dests = {a.dest for a in get_args_parser()._actions if a.dest != "help"}
    assert set(manifest["args"]) == parser_dests
    assert manifest["dataset"]["name"] and len(manifest["dataset"]["fingerprint"]) >= 16
    assert (manifest["dataset"]["train_size"], manifest["dataset"]["val_size"]) == (LIMIT_TRAIN, LIMIT_VAL)
    [epoch] = manifest["history"]
    assert epoch["epoch"] == 1 and epoch["train_loss"] > 0 and epoch["val_loss"] > 0 and epoch["seconds"] > 0
    for who in ("model", "bicubic", "self_ensemble"):
        assert set(manifest["metrics"][who]) == {"mse", "psnr", "ssim"}
    assert 15 < manifest["metrics"]["bicubic"]["psnr"] < 30  # bicubic on real CIFAR-10 images: ~21 dB
    assert manifest["epochs_completed"] == 1 and manifest["device"] == "cpu" and manifest["wall_time_s"] > 0
    assert manifest["torch_version"] == torch.__version__
    assert manifest["weights"] == "last"
    assert set(manifest["files"]) == {"weights.safetensors", "loss_curve.png", "samples.png"}


@pytest.mark.slow
def test_pictures_are_real_pngs(tiny_store):
    sizes = {}
    for filename in ("loss_curve.png", "samples.png"):
        data = tiny_store.read_file("fc", 1, filename)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "PNG"
        assert np.asarray(image.convert("L")).std() > 10  # something is drawn, not a blank canvas
        sizes[filename] = image.size
    width, height = sizes["samples.png"]
    assert height > 1.5 * width  # 8 rows (validation images) of 4 columns (input, original, model, bicubic)
    width, height = sizes["loss_curve.png"]
    assert width > height  # two panels side by side: losses and PSNR


@pytest.mark.slow
def test_killed_run_resumes_from_last_finished_epoch_and_matches_an_uninterrupted_run(data_dir, cache_dir, tmp_path, val_images, caplog):
    checkpoints, killed_store, reference_store = tmp_path / "ck", tmp_path / "killed", tmp_path / "reference"
    args = cli_args(data_dir, killed_store, cache_dir, "--models", "conv", "--epochs", "3", "--checkpoint-dir", str(checkpoints))
    job = subprocess.Popen([sys.executable, "-m", "trainer", *args], env=subprocess_env(cache_dir),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = checkpoints / "conv" / "state.json"
    deadline = time.monotonic() + 180
    while not state.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate()
    assert job.returncode == -signal.SIGKILL, f"the job was not killed mid-run:\n{stderr}"
    finished = json.loads(state.read_text())["epoch"]
    assert 1 <= finished < 3
    assert ModelStore(killed_store).models() == []  # killed before publishing: nothing visible

    with caplog.at_level("INFO", logger="trainer"):
        assert main([*args, "--resume"]) == 0
    assert f"event=resume checkpoint_dir={checkpoints / 'conv'} epoch={finished}" in caplog.text
    resumed = assert_reproduces_metrics(ModelStore(killed_store), "conv", val_images)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]

    # Same seed, uninterrupted: the resumed run is the same computation, bit for bit.
    assert main([a for a in args if a != str(checkpoints) and a != "--checkpoint-dir"] + ["--store", str(reference_store)]) == 0
    reference = ModelStore(reference_store).manifest("conv")
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in reference["history"]]


@pytest.mark.slow
def test_resume_extends_a_published_run_once_and_refuses_a_different_recipe(data_dir, cache_dir, tmp_path, caplog):
    store_root, checkpoints = tmp_path / "store", tmp_path / "ck"
    args = cli_args(data_dir, store_root, cache_dir, "--models", "conv", "--checkpoint-dir", str(checkpoints), "--resume")
    store = ModelStore(store_root)
    assert main([*args, "--epochs", "1"]) == 0  # nothing to resume yet: starts fresh
    assert main([*args, "--epochs", "2"]) == 0  # continues with epoch 2
    assert store.versions("conv") == [1, 2]
    assert [h["epoch"] for h in store.manifest("conv", 2)["history"]] == [1, 2]
    assert store.manifest("conv", 2)["history"][0] == store.manifest("conv", 1)["history"][0]
    assert store.manifest("conv", 2)["epochs_completed"] == 2
    # A checkpoint that records the retired coarse-to-fine phase as off is still the same experiment.
    state_file = checkpoints / "conv" / "state.json"
    state = json.loads(state_file.read_text())
    state["run"]["recipe"] |= {"coarse_to_fine": 0.0, "fine_lr_scale": 0.1}
    state_file.write_text(json.dumps(state))

    with caplog.at_level("INFO", logger="trainer"):
        assert main([*args, "--epochs", "2"]) == 0  # already trained and published: no duplicate version
        assert "reason=already_published version=2" in caplog.text
        assert store.versions("conv") == [1, 2]
        assert main([*args, "--epochs", "3", "--lr", "0.01"]) == 1
    assert "cannot resume" in caplog.text and "lr: 0.001 -> 0.01" in caplog.text
    assert store.versions("conv") == [1, 2]


@pytest.mark.slow
def test_max_minutes_stops_after_the_last_epoch_that_fits(data_dir, cache_dir, tmp_path):
    store = ModelStore(tmp_path / "store")
    assert main(cli_args(data_dir, store.root, cache_dir, "--models", "conv", "--epochs", "3", "--max-minutes", "1e-6")) == 0
    manifest = store.manifest("conv")
    assert manifest["epochs_completed"] == 1 and len(manifest["history"]) == 1
    assert manifest["recipe"]["epochs"] == 3 and manifest["args"]["max_minutes"] == 1e-6


@pytest.mark.slow
def test_recipe_flags_train_and_publish_the_ema_weights(data_dir, cache_dir, tmp_path, val_images):
    store = ModelStore(tmp_path / "store")
    flags = ["--loss", "charbonnier", "--lr-schedule", "onecycle", "--augment", "dihedral", "--ema", "0.9"]
    assert main(cli_args(data_dir, store.root, cache_dir, "--models", "conv", "--epochs", "2", "--publish-as", "conv-tricks", *flags)) == 0
    manifest = assert_reproduces_metrics(store, "conv-tricks", val_images, loss="charbonnier")
    assert manifest["recipe"].items() >= {"loss": "charbonnier", "lr_schedule": "onecycle", "augment": "dihedral", "ema": 0.9}.items()
    assert manifest["weights"] == "ema"
    assert manifest["architecture"]["name"] == "conv"
    assert manifest["history"][-1]["lr"] < 1e-3 * 0.5  # well into the one-cycle anneal


@pytest.mark.slow
def test_torchrun_two_process_gloo_run_publishes_one_contract_model(data_dir, cache_dir, tmp_path, val_images):
    store = ModelStore(tmp_path / "store")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer", *cli_args(data_dir, store.root, cache_dir, "--models", "conv", "--epochs", "1", "--device", "cpu")]
    result = subprocess.run(command, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert store.versions("conv") == [1]  # rank 0 alone publishes
    manifest = assert_reproduces_metrics(store, "conv", val_images)
    assert CONTRACT_KEYS <= manifest.keys()
    assert manifest["recipe"]["world_size"] == 2 and manifest["recipe"]["global_batch_size"] == 256
    assert manifest["epochs_completed"] == 1 and manifest["parameter_count"] == 117_655
    assert "event=published model=conv version=1" in result.stderr
    assert "world_size=2 backend=gloo" in result.stderr


@pytest.mark.slow
def test_torchrun_with_one_process_still_joins_a_process_group(data_dir, cache_dir, tmp_path):
    """What bench/gpu_check.sh runs on one GPU (there with NCCL): a 1-process torchrun job trains under DDP and publishes."""
    store = ModelStore(tmp_path / "store")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "trainer", *cli_args(data_dir, store.root, cache_dir, "--models", "fc", "--epochs", "1", "--device", "cpu")]
    result = subprocess.run(command, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world_size=1 backend=gloo" in result.stderr and store.versions("fc") == [1]


def test_console_script_rejects_an_unknown_model_by_name(tmp_path):
    script = Path(sys.executable).parent / "upgrader-train"  # the installed entry point, as a user runs it
    result = subprocess.run([str(script), "--models", "conv,resnet-9000", "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown model(s) ['resnet-9000']" in result.stderr
    assert f"known: {', '.join(sorted(ARCHITECTURES))}" in result.stderr


def test_help_documents_the_recipe_flags():
    text = get_args_parser().format_help()
    for flag in ("--models", "--max-minutes", "--resume", "--loss", "--lr-schedule", "--augment", "--ema",
                 "--arch-params", "--amp", "--compile", "--device", "--limit-train"):
        assert flag in text


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--models", "fc,conv", "--publish-as", "x"], "--publish-as names one model"),
    (["--ema", "1.5"], "--ema 1.5 is out of range"),
    (["--arch-params", "[1, 2]"], "must be a JSON object"),
    (["--loss", "huber"], "invalid choice: 'huber'"),
    (["--coarse-to-fine", "0.3"], "unrecognized arguments: --coarse-to-fine"),
])
def test_cli_rejects_bad_flags(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_init_from_fine_tunes_a_published_version_and_records_it(tiny_store, data_dir, cache_dir, tmp_path, caplog):
    tiny_store = ModelStore(shutil.copytree(tiny_store.root, tmp_path / "store"))  # the shared one stays as other tests expect
    source = tiny_store.manifest("conv")
    # Adam moves each weight by about lr per step: with a tiny lr the fine-tune stays next to its start.
    assert main(cli_args(data_dir, tiny_store.root, cache_dir, "--models", "conv", "--epochs", "1", "--lr", "1e-9",
                         "--publish-as", "conv-tuned", "--init-from", f"conv:{source['version']}")) == 0
    tuned = tiny_store.manifest("conv-tuned")
    assert tuned["recipe"]["init_from"] == {"name": "conv", "version": source["version"], "weights_sha256": source["weights_sha256"],
                                            "wall_time_s": source["wall_time_s"], "psnr": source["metrics"]["model"]["psnr"]}
    start, _ = tiny_store.load_state_dict("conv")
    end, _ = tiny_store.load_state_dict("conv-tuned")
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in start)
    # ... while the same run from a random init is far from it.
    assert main(cli_args(data_dir, tmp_path / "fresh", cache_dir, "--models", "conv", "--epochs", "1", "--lr", "1e-9")) == 0
    random_start, _ = ModelStore(tmp_path / "fresh").load_state_dict("conv")
    assert not all(torch.allclose(start[k], random_start[k], atol=1e-6) for k in start)
    # A different architecture, or a version that does not exist, is refused by name.
    assert main(cli_args(data_dir, tiny_store.root, cache_dir, "--models", "fc", "--publish-as", "x", "--init-from", "conv")) == 1
    assert "--init-from conv is" in caplog.text and '"name": "conv"' in caplog.text
    assert main(cli_args(data_dir, tiny_store.root, cache_dir, "--models", "conv", "--publish-as", "x", "--init-from", "conv:99")) == 1
    assert "--init-from conv:99" in caplog.text and "no version 99" in caplog.text
    assert "x" not in tiny_store.models()


def test_init_from_grows_a_published_version_by_identity_blocks_and_refuses_other_changes(data_dir, cache_dir, tmp_path, caplog):
    store = ModelStore(tmp_path / "store")
    small = '{"width": 8, "depth": 1}'
    assert main(cli_args(data_dir, store.root, cache_dir, "--models", "subpixel_residual", "--epochs", "1", "--arch-params", small,
                         "--publish-as", "sr")) == 0
    # With a tiny lr the grown model stays where it started: the published model's function, one block larger.
    assert main(cli_args(data_dir, store.root, cache_dir, "--models", "subpixel_residual", "--epochs", "1", "--lr", "1e-9",
                         "--arch-params", '{"width": 8, "depth": 1, "global_attention": 1}', "--publish-as", "sr-grown",
                         "--init-from", "sr:1")) == 0
    source, grown = store.load("sr")[0], store.load("sr-grown")[0]
    assert store.manifest("sr-grown")["recipe"]["init_from"]["grown"] == {"from_params": {"width": 8, "depth": 1}, "new_modules": ["context.0"]}
    assert len(grown.context) == 1 and len(source.context) == 0
    inputs = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(grown(inputs), source(inputs), atol=1e-4)
    # Changing what the published tensors are (here the width) is not a growth, and is refused by name.
    assert main(cli_args(data_dir, store.root, cache_dir, "--models", "subpixel_residual", "--arch-params", '{"width": 12, "depth": 1}',
                         "--publish-as", "x", "--init-from", "sr:1")) == 1
    assert "--init-from sr:1 is" in caplog.text and "have no place here (first: body.0.conv1.bias)" in caplog.text
    assert "x" not in store.models()
    # New modules that do not start as the identity would discard the published model's function: refused too.
    state_dict, manifest = store.load_state_dict("sr")
    not_identity = build_model("subpixel_residual", width=8, depth=1, global_attention=1)
    torch.nn.init.normal_(not_identity.context[0].proj.weight)
    with pytest.raises(ValueError, match="the new modules are not the identity at the start"):
        grow(not_identity, state_dict, manifest["architecture"],
             {"name": "subpixel_residual", "params": {"width": 8, "depth": 1, "global_attention": 1}}, "sr:1")


def test_cli_names_missing_data_and_misfitting_arch_params(tmp_path, data_dir, cache_dir, caplog):
    missing = tmp_path / "no-such-dataset"
    assert main(["--data", str(missing), "--store", str(tmp_path / "s"), "--no-progress"]) == 1
    assert str(missing) in caplog.text
    assert main(cli_args(data_dir, tmp_path / "s", cache_dir, "--models", "conv", "--arch-params", '{"width": 8}')) == 1
    assert "do not fit architecture 'conv'" in caplog.text
    assert not (tmp_path / "s").exists() or ModelStore(tmp_path / "s").models() == []


# ---- recipe pieces --------------------------------------------------------------------------------


def test_learning_rate_schedules():
    assert [LR_SCHEDULES["cosine"](p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])
    one_cycle = [LR_SCHEDULES["onecycle"](p) for p in (0.0, 0.3, 1.0)]
    assert one_cycle == pytest.approx([1 / 25, 1.0, 1 / 25 / 1e4])
    assert max(LR_SCHEDULES["onecycle"](p / 100) for p in range(101)) == pytest.approx(1.0)
    assert learning_rate(0, 100, base_lr=1e-3, schedule="constant") == learning_rate(99, 100, base_lr=1e-3, schedule="constant") == 1e-3
    assert learning_rate(50, 100, base_lr=1e-3, schedule="cosine") == pytest.approx(5e-4)


def test_psnr_loss_is_minus_the_mean_per_image_psnr_and_leans_on_the_easy_images():
    torch.manual_seed(0)
    targets = torch.rand(2, 3, 32, 32)
    noise = torch.randn(2, 3, 32, 32) * torch.tensor([0.01, 0.1]).view(2, 1, 1, 1)  # a near-exact image, a poor one
    outputs = (targets + noise).requires_grad_()
    loss = psnr_loss(outputs, targets)
    assert loss.item() == pytest.approx(-psnr_per_image(outputs.detach(), targets).mean().item(), abs=0.05)
    loss.backward()
    per_pixel = outputs.grad.abs().flatten(1).mean(1)
    assert per_pixel[0] > 5 * per_pixel[1]  # each image's error weighed by 1 / its MSE: the near-exact one leads
    mse_grad = torch.autograd.grad(torch.nn.functional.mse_loss(outputs, targets), outputs)[0].abs().flatten(1).mean(1)
    assert mse_grad[1] > 5 * mse_grad[0]  # where MSE (and L1, less so) follow the poor one
    exact = targets.clone().requires_grad_()
    floor = psnr_loss(exact, targets)
    floor.backward()
    assert floor.item() == pytest.approx(10 * np.log10(PSNR_LOSS_FLOOR)) and torch.isfinite(exact.grad).all()


@pytest.mark.slow
def test_psnr_loss_and_8bit_inputs_train_publish_and_are_recorded(data_dir, cache_dir, tmp_path, val_images):
    store = ModelStore(tmp_path / "store")
    flags = ["--models", "conv", "--epochs", "1", "--loss", "psnr", "--quantize-inputs"]
    assert main(cli_args(data_dir, store.root, cache_dir, *flags)) == 0
    manifest = assert_reproduces_metrics(store, "conv", val_images, loss="psnr")
    assert manifest["recipe"]["loss"] == "psnr" and manifest["recipe"]["quantize_inputs"] is True
    assert -40 < manifest["history"][0]["train_loss"] < -5  # minus a PSNR in dB
    # The same run on exact float inputs (training is deterministic on the CPU) ends with other weights.
    assert main(cli_args(data_dir, store.root, cache_dir, *flags[:-1], "--publish-as", "conv-float-inputs")) == 0
    assert "quantize_inputs" not in store.manifest("conv-float-inputs")["recipe"]
    rounded, exact = store.load_state_dict("conv")[0], store.load_state_dict("conv-float-inputs")[0]
    assert not all(torch.equal(rounded[k], exact[k]) for k in rounded)


def test_amp_auto_trains_in_bf16_on_a_cpu_that_has_it_and_reduces_the_loss(data_dir, cache_dir, tmp_path):
    def train(amp: str) -> dict:
        store = tmp_path / amp
        argv = cli_args(data_dir, store, cache_dir, "--device", "cpu", "--amp", amp, "--models", "subpixel_residual",
                        "--arch-params", '{"width": 16, "depth": 2}', "--epochs", "4", "--loss", "l1", "--lr", "2e-3", "--batch-size", "32")
        assert main(argv) == 0
        return ModelStore(store).manifest("subpixel_residual")

    manifest = train("auto")
    assert manifest["recipe"]["amp"] == ("bf16" if native_bf16_cpu() else "none") and manifest["device"] == "cpu"
    losses = [h["train_loss"] for h in manifest["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    if native_bf16_cpu():  # the same seeded run in float32 (deterministic) lands elsewhere: bf16 really ran
        assert train("none")["weights_sha256"] != manifest["weights_sha256"]


def test_dihedral_augment_uses_all_eight_symmetries_per_image(real_images):
    images = real_images.float() / 255
    augmented = dihedral_augment(images, torch.Generator().manual_seed(0))

    def symmetries(image):
        rotations = [torch.rot90(image, k, (-2, -1)) for k in range(4)]
        return rotations + [r.flip(-1) for r in rotations]

    used = set()
    for original, result in zip(images, augmented):
        matches = [i for i, s in enumerate(symmetries(original)) if torch.equal(s, result)]
        assert matches, "an augmented image is not a flip/rotation of its original"
        used.add(matches[0])
    assert used == set(range(8))


def test_ema_averages_weights_and_buffers():
    torch.manual_seed(0)
    model = build_model("resnet18")  # has BatchNorm buffers, including integer counters
    ema = EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.averaged.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.rand(4, 3, 8, 8))  # moves running stats and num_batches_tracked
    ema.update(step=1000)  # past the warm-up: decay 0.5
    live, averaged = model.state_dict(), ema.averaged.state_dict()
    for key, value in averaged.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.5 * before[key] + 0.5 * live[key])
        else:
            assert torch.equal(value, live[key])
    assert not any(p.requires_grad for p in ema.averaged.parameters())


def test_checkpoint_round_trip_restores_adam_exactly_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = build_model("conv")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(4, 3, 8, 8)).mean().backward()
        optimizer.step()
    ema = EMA(model, 0.99)
    save_checkpoint(tmp_path, Checkpoint(epoch=3, step=2, history=[{"epoch": 3}], run={"recipe": {"lr": 1e-3}},
                                         model=model.state_dict(), optimizer=optimizer.state_dict(), ema=ema.averaged.state_dict()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0003.safetensors", "state.json"]
    load_file(tmp_path / "epoch-0003.safetensors")  # plain safetensors, readable without torch.load
    restored = load_checkpoint(tmp_path)
    assert (restored.epoch, restored.step, restored.history, restored.run) == (3, 2, [{"epoch": 3}], {"recipe": {"lr": 1e-3}})

    fresh = build_model("conv")
    fresh.load_state_dict(restored.model)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(restored.optimizer)
    original, reloaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert json.loads(json.dumps(original["param_groups"])) == reloaded["param_groups"]  # betas: tuple -> list
    for param, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(value, reloaded["state"][param][key])
    assert all(torch.equal(v, restored.ema[k]) for k, v in ema.averaged.state_dict().items())

    save_checkpoint(tmp_path, Checkpoint(epoch=4, step=4, history=[], run={}, model=model.state_dict(),
                                         optimizer=optimizer.state_dict()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0004.safetensors", "state.json"]  # old epoch cleaned up
    assert load_checkpoint(tmp_path).ema is None
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_ema_follows_weights_loaded_in_place_after_it_was_made():
    """The EMA pairs tensors once: a checkpoint or DDP broadcast loaded into the live model later must still be followed."""
    torch.manual_seed(0)
    model = build_model("conv")
    ema = EMA(model, decay=0.0)  # no averaging past the warm-up: the average becomes the live weights
    other = build_model("conv")
    model.load_state_dict(other.state_dict())  # in place, as resume and --init-from do
    ema.update(step=10**9)
    for key, value in ema.averaged.state_dict().items():
        torch.testing.assert_close(value, other.state_dict()[key])
