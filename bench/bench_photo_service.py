"""One photo through the real service: today's tiled 8x8 path against whole-image inference by photo_residual.

    .venv/bin/python bench/bench_photo_service.py                        # pretrained/upgrader vs an untrained 64x8 photo_residual
    .venv/bin/python bench/bench_photo_service.py --photo-store runs/photo/snapshots --photo-model photo

Starts two servers as real subprocesses on free loopback ports (`python -m service`, UPGRADER_WORKERS=1 and one
torch thread: one worker of the default two on a 2-core machine; precision and CPU forward as the service picks them):

* tiled: the 8x8 model (pretrained/upgrader, the shipped one), POST /upscale?tile=true: the photo is cut into
  overlapping 8x8 tiles (every pixel computed ~4 times) and blended (service.runtime.tiling);
* whole: a photo_residual version (the published one given by --photo-store, else an untrained one with the
  architecture of the run training in runs/photo: speed does not depend on the weights), the whole photo in one
  forward (service.runtime.wholeimage).

Each round sends the 256x256 example photo (service/static/examples) once to each server, interleaved, with
`Accept: image/png`, and times the answer (a 1024x1024 PNG): output megapixels a second, median and best of the
rounds. Peak memory is each server process's VmHWM (peak resident set), read from /proc after those rounds. Then
one 1024x1024 photo (the example tiled 4x4; UPGRADER_MAX_WHOLE_IMAGE_PIXELS, the largest accepted) goes to the
whole-image server alone: cut into windows within UPGRADER_MAX_FORWARD_PIXELS, its time and the peak memory after it.
"""

from __future__ import annotations

import argparse
import io
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
import numpy as np
import torch
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
from model_store import ModelStore  # noqa: E402
from upgrader.architectures import build_model, parameter_count  # noqa: E402

PHOTO = PROJECT_ROOT / "service" / "static" / "examples" / "astronaut-256x256.png"
TRAINING_PARAMS = {"width": 64, "depth": 8}  # trainer/photo.py's default --arch-params, what runs/photo trains


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def untrained_photo_store(root: Path) -> None:
    """An untrained photo_residual with the training run's architecture and trainer/photo.py's manifest fields."""
    torch.manual_seed(0)
    model = build_model("photo_residual", **TRAINING_PARAMS).eval()
    torch.nn.init.normal_(model.to_subpixels.weight, std=0.01)  # a residual that is not zero, as a trained one's
    manifest = {"architecture": {"name": "photo_residual", "params": TRAINING_PARAMS}, "parameter_count": parameter_count(model),
                "input_shape": [3, None, None], "output_shape": [3, None, None], "degradation": "bicubic-matlab-x4", "scale": 4,
                "recipe": {"recipe": "untrained, for timing (bench/bench_photo_service.py)"}, "metrics": {}}
    ModelStore(root).publish("photo", model.state_dict(), manifest)


class Server:
    def __init__(self, store: Path, model: str, log: Path) -> None:
        self.port, self.model, self.log = free_port(), model, log
        env = {**os.environ, "UPGRADER_STORE": str(store), "UPGRADER_DEFAULT_MODEL": model, "UPGRADER_WORKERS": "1", "UPGRADER_GRPC_PORT": "0",
               "UPGRADER_TORCH_THREADS": "1", "UPGRADER_POLL_INTERVAL_S": "60", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)], cwd=PROJECT_ROOT,
                                     env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server for {self.model} not ready: {self.log.read_text()[-3000:]}")

    def peak_rss_mb(self) -> float:
        """The largest VmHWM of the server process and its children (a worker, when there is one)."""
        pids, peak = [self.proc.pid], 0.0
        while pids:
            pid = pids.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024)
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids += [int(child) for child in (task / "children").read_text().split()]
            except (OSError, StopIteration):
                continue
        return peak

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def post(client: httpx.Client, server: Server, data: bytes, query: str) -> float:
    started = time.perf_counter()
    response = client.post(f"{server.url}/upscale?model={server.model}&{query}", files={"images": ("photo.png", data, "image/png")},
                           headers={"Accept": "image/png"}, timeout=300)
    seconds = time.perf_counter() - started
    if response.status_code != 200 or not response.content.startswith(b"\x89PNG"):
        raise SystemExit(f"{server.model}: {response.status_code} {response.text[:300]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiled-store", type=Path, default=PROJECT_ROOT / "pretrained")
    parser.add_argument("--tiled-model", default="upgrader")
    parser.add_argument("--photo-store", type=Path, help="a store with a published photo_residual (default: an untrained one)")
    parser.add_argument("--photo-model", default="photo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the table's numbers here")
    args = parser.parse_args()

    data = PHOTO.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench-photo-") as tmp:
        tmp = Path(tmp)
        photo_store = args.photo_store
        if photo_store is None:
            photo_store = tmp / "photo-store"
            untrained_photo_store(photo_store)
        tiled_store = tmp / "tiled-store"  # a copy: the service may write next to a store (aliases), never into pretrained/
        shutil.copytree(args.tiled_store / args.tiled_model, tiled_store / args.tiled_model)
        servers = {"tiled 8x8 (tile=true)": (Server(tiled_store, args.tiled_model, tmp / "tiled.log"), "tile=true"),
                   "whole image": (Server(photo_store, args.photo_model, tmp / "whole.log"), "")}
        try:
            for server, _ in servers.values():
                server.wait_ready()
            times: dict[str, list[float]] = {name: [] for name in servers}
            with httpx.Client() as client:
                models = {name: client.get(f"{s.url}/models/{s.model}").json() for name, (s, _) in servers.items()}
                precision = client.get(f"{servers['whole image'][0].url}/models").json()["precision"]
                for server, query in servers.values():
                    post(client, server, data, query)  # warm-up: the first forward of a new size picks its kernels
                for _ in range(args.rounds):
                    for name, (server, query) in servers.items():
                        times[name].append(post(client, server, data, query))
            peaks = {name: server.peak_rss_mb() for name, (server, _) in servers.items()}
            with Image.open(PHOTO) as image:
                large = np.tile(np.asarray(image.convert("RGB")), (4, 4, 1))
            buffer = io.BytesIO()
            Image.fromarray(large).save(buffer, "PNG", compress_level=1)
            whole = servers["whole image"][0]
            with httpx.Client() as client:
                large_s = post(client, whole, buffer.getvalue(), "")
            megapixels = 1024 * 1024 / 1e6
            cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), "?")
            print(f"\n256x256 -> 1024x1024, one request at a time, {args.rounds} interleaved rounds; {cpu}, {os.cpu_count()} CPUs; "
                  f"one worker, one torch thread, precision {precision}\n")
            print("| path | model | architecture | output MP/s (median) | best | seconds (median) | peak RSS MB |")
            print("|---|---|---|---|---|---|---|")
            for name, (server, _) in servers.items():
                median, best = statistics.median(times[name]), min(times[name])
                arch = models[name].get("architecture") or {}
                print(f"| {name} | {server.model} | {arch.get('name')} {arch.get('params')} | {megapixels / median:.2f} | "
                      f"{megapixels / best:.2f} | {median:.3f} | {peaks[name]:.0f} |")
            print(f"| whole image, 1024x1024 -> 4096x4096 (windows) | {whole.model} | | {16 * megapixels / large_s:.2f} (one run) | | "
                  f"{large_s:.3f} | {whole.peak_rss_mb():.0f} |")
            if args.json:
                args.json.write_text(json.dumps({
                    "cpu": cpu, "cpus": os.cpu_count(), "precision": precision, "rounds": args.rounds,
                    "output_mp_per_s": {name: megapixels / statistics.median(times[name]) for name in servers},
                    "models": {name: server.model for name, (server, _) in servers.items()},
                    "large_output_mp_per_s": 16 * megapixels / large_s}, indent=1))
        finally:
            for server, _ in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
