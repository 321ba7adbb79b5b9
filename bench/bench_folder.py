"""A folder of photos through `upgrader upscale`, against a sequential curl loop and against `--local`, in one run.

    .venv/bin/python bench/bench_folder.py                     # 24 crops of bsd200 at 128x128, --jobs 1,2,4,8
    .venv/bin/python bench/bench_folder.py --files 2 --jobs 1  # a smoke run: does every part work

Starts `python -m service` (the default workers for this machine, the store a copy of pretrained/) on a free loopback
port unless --url names a running one, writes `--files` crops (`--size` square, from the sr-natural bsd200
photographs, different regions) as PNG to a temporary folder, sends one warm-up request, then times, in turn:

* curl: one real `curl` process per file, one after the other (the raw-body form of docs/api.md,
  `POST /upscale?tile=true&model=photo` with `Accept: image/png`), each answer written to a file;
* the command against the server, `--jobs N` for each N of --jobs, into a new OUTDIR each time;
* `--local` with the fastest N: no server, the app in the command's process (loading the models is in its wall
  time; `run s` leaves it out).

Wall time is what a user waits for, process start included; `run s` is the command's own summary (from its
first request to its last answer). Every output is checked to be byte-identical to curl's. Prints the machine,
a table (files/s and output megapixels/s from wall time) and the fastest --jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BSD200 = PROJECT_ROOT.parent / "shared" / "datasets" / "sr-natural" / "bsd200"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_crops(folder: Path, count: int, size: int, source: Path) -> list[Path]:
    files = sorted(source.glob("*.png"))
    if not files:
        sys.exit(f"no photographs in {source}")
    folder.mkdir(parents=True)
    paths = []
    for k in range(count):
        with Image.open(files[k % len(files)]) as image:
            rgb = np.asarray(image.convert("RGB"))
        if min(rgb.shape[:2]) < size:
            sys.exit(f"{files[k % len(files)]} is smaller than {size}x{size}")
        top, left = (37 * k) % (rgb.shape[0] - size + 1), (53 * k) % (rgb.shape[1] - size + 1)
        path = folder / f"crop{k:03d}.png"
        Image.fromarray(rgb[top : top + size, left : left + size]).save(path)
        paths.append(path)
    return paths


def start_server(store: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "UPGRADER_STORE": str(store), "UPGRADER_GRPC_PORT": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the service did not start; its log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def curl_loop(url: str, model: str, paths: list[Path], out: Path) -> float:
    out.mkdir()
    started = time.perf_counter()
    for path in paths:
        subprocess.run(["curl", "-sSf", "-H", "Content-Type: image/png", "-H", "Accept: image/png", "--data-binary", f"@{path}",
                        f"{url}/upscale?tile=true&model={model}", "-o", str(out / path.name)], check=True)
    return time.perf_counter() - started


def command(paths_dir: Path, out: Path, model: str, *flags: str) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "service.cli", "upscale", str(paths_dir), "-o", str(out), "--model", model, *flags],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"upgrader upscale {' '.join(flags)} exited {result.returncode}:\n{result.stderr[-4000:]}\n{result.stdout[-2000:]}")
    return wall, json.loads(result.stdout.splitlines()[-1])


def check_same(reference: Path, out: Path, paths: list[Path]) -> None:
    for path in paths:
        if (out / path.name).read_bytes() != (reference / path.name).read_bytes():
            sys.exit(f"{out / path.name} differs from curl's answer for {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--size", type=int, default=128, help="side of each square crop (pixels)")
    parser.add_argument("--source", type=Path, default=BSD200, help="a folder of PNG photographs")
    parser.add_argument("--jobs", default="1,2,4,8", help="the --jobs values to time")
    parser.add_argument("--model", default="photo")
    parser.add_argument("--url", help="a running service (default: start one on a copy of pretrained/)")
    parser.add_argument("--no-local", action="store_true", help="leave out --local")
    args = parser.parse_args()
    jobs = [int(j) for j in args.jobs.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-folder-") as tmp:
        root = Path(tmp)
        paths = write_crops(root / "photos", args.files, args.size, args.source)
        server = None
        url = args.url
        if url is None:
            shutil.copytree(PROJECT_ROOT / "pretrained", root / "store")
            port = free_port()
            server = start_server(root / "store", port, root / "service.log")
            url = f"http://127.0.0.1:{port}"
        os.environ["UPGRADER_URL"] = url
        try:
            subprocess.run(["curl", "-sSf", "-H", "Content-Type: image/png", "--data-binary", f"@{paths[0]}", "-o", os.devnull,
                            f"{url}/upscale?tile=true&model={args.model}"], check=True)  # warm-up
            output_mp = sum(4 * Image.open(p).width * 4 * Image.open(p).height for p in paths) / 1e6
            rows = [("curl loop (sequential)", "-", curl_loop(url, args.model, paths, root / "curl"), None)]
            for n in jobs:
                out = root / f"jobs{n}"
                wall, summary = command(root / "photos", out, args.model, "--jobs", str(n))
                check_same(root / "curl", out, paths)
                rows.append(("upgrader upscale", str(n), wall, summary["seconds"]))
            best = min(jobs, key=lambda n: next(r[2] for r in rows if r[1] == str(n)))
            if not args.no_local:
                wall, summary = command(root / "photos", root / "local", args.model, "--local", "--jobs", str(best))
                check_same(root / "curl", root / "local", paths)
                rows.append(("upgrader upscale --local", str(best), wall, summary["seconds"]))
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)

    print(f"{args.files} photos {args.size}x{args.size} -> {4 * args.size}x{4 * args.size} ({output_mp:.2f} output MP), model "
          f"{args.model}; {cpu_model()}, {os.cpu_count()} CPUs; server: {'--url ' + args.url if args.url else 'python -m service, default workers'}")
    print(f"{'what':28} {'jobs':>4} {'wall s':>8} {'run s':>7} {'files/s':>8} {'output MP/s':>12}")
    for what, n, wall, run in rows:
        print(f"{what:28} {n:>4} {wall:8.2f} {'-' if run is None else f'{run:.2f}':>7} {args.files / wall:8.2f} {output_mp / wall:12.3f}")
    print(f"fastest --jobs: {best}")


if __name__ == "__main__":
    main()
