"""The README's headline table, measured in one run on this machine, each number beside a baseline from the same run.

    .venv/bin/python bench/headline.py                               # every row but Triton's (about 15 minutes)
    .venv/bin/python bench/headline.py --triton-python /opt/tv/bin/python \\
        --perf-analyzer PA/bin/perf_analyzer --perf-lib-path PA/nvidia/cuda_runtime/lib   # and Triton's (about 25 more)

Each row runs the script the README names for it, as a subprocess, and reads the numbers from its --json:

* quality: the trainer's own evaluation (`trainer.train.evaluate`, as tests/test_pretrained.py runs it) of the
  shipped `upgrader` on the whole CIFAR-10 test split and the natural-photo validation tiles; baseline bicubic;
* x4 photos: bench/bench_photo_x4.py through a service started here on a store seeded from pretrained/
  (`model=photo` as a client sends it, input routing included); baseline MATLAB bicubic of the same LR;
* photo speed: bench/bench_photo_service.py (one 256x256 photo to 1024x1024, one worker, one torch thread);
  baseline the 8x8 model's tiled path through the same service code;
* Triton: bench/bench_triton.py over REST, then gRPC, on a store of the shipped `upgrader` and a fresh `conv`;
  baseline Triton serving the same weights with the same OpenVINO forward, under perf_analyzer;
* overload: bench/overload.py for `/upscale` and `/v2`; baseline the same server's peak at 8-16 clients.

Prints the markdown table (and writes it to --out); the README's "Headline numbers" carry it as printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_service import DEFAULT_DATA, load_images, publish_fresh  # noqa: E402

from model_store import ModelStore  # noqa: E402
from trainer.data import load_image_data  # noqa: E402
from trainer.natural import load_natural_data  # noqa: E402
from trainer.train import evaluate  # noqa: E402

PYTHON = sys.executable


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores"


def run(script: str, *args: str, timeout: float = 3600) -> dict:
    """Run bench/SCRIPT with ARGS and --json; its output goes to this terminal as it comes, its numbers come back."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [PYTHON, str(ROOT / "bench" / script), *args, "--json", out.name]
        print(f"\n$ {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT, timeout=timeout)
        return json.loads(Path(out.name).read_text())


def quality(data: Path, cache: Path) -> dict:
    """The shipped upgrader and bicubic on the CIFAR-10 test split and the natural validation tiles, as served."""
    model, _ = ModelStore(ROOT / "pretrained").load("upgrader")
    sets = {"cifar": load_image_data(data, cache_dir=cache, limit_train=64, progress=False).val,
            "natural": load_natural_data(data.parent / "sr-natural", cache_dir=cache, progress=False).val}
    with torch.inference_mode():
        return {name: evaluate(model, images, torch.device("cpu"), loss_name="l1", baseline=True) for name, images in sets.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_x4(tmp: Path) -> dict:
    """bench_photo_x4 through a service with the default settings on a store seeded like `make run`'s."""
    store = tmp / "store"
    subprocess.run([PYTHON, "-m", "model_store", "--store", str(store), "init", "--seed", str(ROOT / "pretrained")],
                   check=True, cwd=ROOT, capture_output=True)
    port = free_port()
    log = (tmp / "service.log").open("w")
    service = subprocess.Popen([PYTHON, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "UPGRADER_STORE": str(store), "UPGRADER_GRPC_PORT": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not get ready:\n{(tmp / 'service.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        return run("bench_photo_x4.py", "--url", url, "--served", "photo", "--tiled", "none", "--degradations", "bicubic")
    finally:
        service.terminate()
        service.wait(60)


def triton(tmp: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """bench_triton's verdicts (ratio of req/s at each concurrency >= 32) over REST and over gRPC."""
    store = ModelStore(tmp / "triton-store")
    shutil.copytree(ROOT / "pretrained" / "upgrader", store.root / "upgrader")
    targets, pngs = load_images(args.data, 256)
    publish_fresh(store, "conv", 0, targets, pngs)
    common = ["--store", str(store.root), "--models", "upgrader,conv", "--concurrency", "32,128", "--rounds", str(args.triton_rounds),
              "--triton-forward", "openvino", "--triton-python", args.triton_python, "--perf-analyzer", args.perf_analyzer,
              "--perf-lib-path", args.perf_lib_path]
    return {protocol: run("bench_triton.py", *common, "--protocol", protocol)["verdicts"] for protocol in ("http", "grpc")}


def overload(transport: str, args: argparse.Namespace) -> float:
    """Goodput under 8x overload over the peak at 8-16 clients (before and after it, averaged), medians of the rounds."""
    phases = next(iter(run("overload.py", "--no-baseline", "--transport", transport, "--overload-s", str(args.overload_s),
                           "--rounds", str(args.overload_rounds))["phases"].values()))
    peak = (max(p["goodput"] for p in phases if p["phase"] == "healthy")
            + max(p["goodput"] for p in phases if p["phase"] == "healthy-after")) / 2
    return statistics.median(p["goodput"] for p in phases if p["phase"] == "overload") / peak


def table(results: dict, where: str) -> str:
    q, x4, speed = results["quality"], results["photo_x4"], results["photo_speed"]
    served = next(label for label in x4 if label.startswith("photo"))
    rows = [
        ("quality, CIFAR-10 test split (as served)", f"{q['cifar']['model']['psnr']:.3f} dB",
         f"bicubic {q['cifar']['bicubic']['psnr']:.3f} (**{q['cifar']['model']['psnr'] - q['cifar']['bicubic']['psnr']:+.3f} dB**)", "any"),
        ("quality, natural photo tiles (as served)", f"{q['natural']['model']['psnr']:.3f} dB",
         f"bicubic {q['natural']['bicubic']['psnr']:.3f} (**{q['natural']['model']['psnr'] - q['natural']['bicubic']['psnr']:+.3f} dB**)", "any"),
        ("x4 photos, Set5 / Set14 PSNR-Y, `model=photo` through the service",
         f"{x4[served]['Set5 bicubic']:.2f} / {x4[served]['Set14 bicubic']:.2f} dB",
         f"bicubic {x4['bicubic']['Set5 bicubic']:.2f} / {x4['bicubic']['Set14 bicubic']:.2f}", "any"),
        ("one 256×256 photo → 1024×1024 through the service, `model=photo`",
         f"{speed['output_mp_per_s']['whole image']:.2f} output MP/s", f"8×8 tiles: {speed['output_mp_per_s']['tiled 8x8 (tile=true)']:.2f}", where),
    ]
    if "triton" in results:
        for protocol, label in (("http", "`/v2` infer against Triton 2.51 (same OpenVINO forward), REST, c = 32 / 128"),
                                ("grpc", "the same over gRPC")):
            ratios = {(v["model"], v["concurrency"]): v["ratio"] for v in results["triton"][protocol]}
            cells = ", ".join(f"`{m}` {' / '.join(f'{ratios[(m, c)]:.2f}×' for c in (32, 128))}" for m in ("conv", "upgrader"))
            rows.append((label, cells, f"Triton under `perf_analyzer{' -i grpc' if protocol == 'grpc' else ''}`", where))
    rows.append(("goodput at 8× overload (512 clients × 64 images), `/upscale` / `/v2`",
                 f"{100 * results['overload']['upscale']:.0f}% / {100 * results['overload']['v2']:.0f}% of peak",
                 "the same server at 8-16 clients", where))
    return "\n".join(["| what | number | baseline | machine |", "|---|---|---|---|"] + [f"| {' | '.join(r)} |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 (sr-natural is looked for beside it)")
    p.add_argument("--photo-rounds", type=int, default=3)
    p.add_argument("--overload-s", type=float, default=20.0)
    p.add_argument("--overload-rounds", type=int, default=2)
    p.add_argument("--triton-python", help="a Python with nvidia-pytriton (its tritonserver); without it, no Triton rows")
    p.add_argument("--perf-analyzer", default="perf_analyzer")
    p.add_argument("--perf-lib-path", default="")
    p.add_argument("--triton-rounds", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the table (markdown) and the numbers (.json beside it) here")
    args = p.parse_args()

    where = machine()
    started = time.monotonic()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="headline-") as tmp:
        tmp = Path(tmp)
        print("quality: the shipped upgrader on CIFAR-10 test and the natural tiles", flush=True)
        results["quality"] = quality(args.data, tmp / "cache")
        results["photo_x4"] = photo_x4(tmp)
        results["photo_speed"] = run("bench_photo_service.py", "--photo-store", str(ROOT / "pretrained"), "--rounds", str(args.photo_rounds))
        results["overload"] = {transport: overload(transport, args) for transport in ("upscale", "v2")}
        if args.triton_python:
            results["triton"] = triton(tmp, args)
    text = (f"{where}; {time.strftime('%Y-%m-%d')}; {(time.monotonic() - started) / 60:.0f} min; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n\n{table(results, where)}")
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"machine": where, **results}, indent=1, default=str))


if __name__ == "__main__":
    main()
