"""Images of any size through the real service: quality on real photos, seams, throughput, fairness.

    .venv/bin/python bench/bench_tiling.py --store store                 # every model in the store
    .venv/bin/python bench/bench_tiling.py --store store --photos 40     # a quicker subset of sr-natural

Needs `pip install -e '.[bench]'` (scikit-image for its photographs). Starts the service as real
subprocesses on free loopback ports (UPGRADER_WORKERS=1, one torch thread, like the in-process
figures) and measures, each against a baseline taken in the same run:

1. Quality: every photo of `skimage.data` (the photographs, grey ones as RGB) and of
   ../shared/datasets/sr-natural is cropped to a multiple of 4, reduced 4x the trainer's way
   (antialiased bilinear, upgrader.imaging), sent whole to POST /upscale?tile=true for every model,
   and compared with the original: mean PSNR/SSIM per model and dataset, next to Pillow bicubic on
   the same inputs.
2. Seams: PSNR in a band of 2 output pixels either side of the plain tile grid (every 32 output
   pixels, image edges excluded) vs everywhere else, pooled over the photos. Bicubic has no tiles:
   its band-vs-rest gap is what those positions cost anyway. For the fully convolutional model the
   plain layout is also run in process, to show what the overlapping, blended tiles remove.
3. Throughput: megapixels of output per second for one 256x256 photo (a 1024x1024 result) with
   the best model (the service's default), through the service and in process (tiling.cut ->
   Upscaler.run_batch in batches of 64 -> tiling.stitch, one torch thread), interleaved rounds.
4. Fairness: latency of single 8x8 requests (4 closed-loop clients) alone, while 256x256 images
   are being upscaled by the same model (2 clients), and the same with the large image's share of
   a batch uncapped (service.runtime.batching.BULK_SHARE = 1.0 in a second server), interleaved rounds.

Absolute quality numbers are those of whatever models are in the store.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
from bench_service import ServerProcess, ServerSpec, free_port  # noqa: E402

from model_store import ModelStore  # noqa: E402
from service.runtime import tiling  # noqa: E402
from service.runtime.upscaler import Upscaler  # noqa: E402
from upgrader.architectures import fully_convolutional  # noqa: E402
from upgrader.imaging import psnr_per_image, ssim_per_image, to_float  # noqa: E402

SKIMAGE_PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "clock", "brick", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "retina", "cell", "page", "text"]
SR_NATURAL = PROJECT_ROOT.parent / "shared" / "datasets" / "sr-natural"
BAND = 2  # output pixels either side of a tile border


# ---- data ------------------------------------------------------------------------------------------
def skimage_photos() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    photos = []
    for name in SKIMAGE_PHOTOS:
        array = getattr(data, name)()
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        photos.append((name, np.ascontiguousarray(array[:, :, :3])))
    return photos


def sr_natural_photos(limit: int | None) -> list[tuple[str, np.ndarray]]:
    files = sorted(SR_NATURAL.glob("*/*.png")) + sorted(SR_NATURAL.glob("*/*.jpg"))
    return [(f.stem, np.asarray(Image.open(f).convert("RGB"))) for f in files[:limit]]


def reduce_4x(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """H x W x 3 photo -> (target cropped to a multiple of 4, 3 x 4h x 4w; input 3 x h x w), reduced like the trainer."""
    h, w = photo.shape[0] // 4, photo.shape[1] // 4
    target = torch.from_numpy(np.ascontiguousarray(photo[: 4 * h, : 4 * w])).permute(2, 0, 1)
    small = F.interpolate(to_float(target[None]), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    small = small.mul(255).round().clamp(0, 255).to(torch.uint8)[0]
    return target.numpy(), small.numpy()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def unpng(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def bicubic(image: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    return np.asarray(pil.resize((pil.width * 4, pil.height * 4), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


# ---- scores ------------------------------------------------------------------------------------------
def seam_mask(height: int, width: int) -> np.ndarray:
    """True within BAND output pixels of an interior border of the plain 8x8-input tile grid."""
    def near(n: int) -> np.ndarray:
        coords = np.arange(n)
        offset = coords % 32
        return ((offset < BAND) | (offset >= 32 - BAND)) & (coords >= BAND) & (coords < n - BAND)

    rows, cols = near(height), near(width)
    return rows[:, None] | cols[None, :]


class Scores:
    def __init__(self) -> None:
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.band = [0.0, 0]  # squared error sum, count
        self.rest = [0.0, 0]

    def add(self, output: np.ndarray, target: np.ndarray) -> None:
        a, b = to_float(torch.from_numpy(np.ascontiguousarray(output))[None]), to_float(torch.from_numpy(target)[None])
        self.psnr.append(float(psnr_per_image(a, b)[0]))
        self.ssim.append(float(ssim_per_image(a, b)[0]))
        error = ((a - b) ** 2).mean(1)[0].numpy()
        mask = seam_mask(*error.shape)
        self.band[0] += float(error[mask].sum())
        self.band[1] += int(mask.sum())
        self.rest[0] += float(error[~mask].sum())
        self.rest[1] += int((~mask).sum())

    @staticmethod
    def _psnr(total: list) -> float:
        return -10 * np.log10(total[0] / max(total[1], 1))

    def row(self) -> tuple[float, float, float, float]:
        return statistics.fmean(self.psnr), statistics.fmean(self.ssim), self._psnr(self.band), self._psnr(self.rest)


def quality(url: str, models: list[str], datasets: dict[str, list], store: ModelStore, fc_model: str | None) -> None:
    print("\n## Quality on real photos (x4, whole images through POST /upscale?tile=true)\n")
    print("| dataset | photos | model | PSNR dB | SSIM | vs bicubic dB | seam band PSNR | elsewhere PSNR | band - elsewhere |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain_fc = None
    if fc_model:  # the fully convolutional model on plain tiles, in process: what the blending removes
        plain_fc = Upscaler(store, fc_model, store.resolve(fc_model, "latest"), torch.device("cpu"), 64)
        plain_fc.setup()
    with httpx.Client(base_url=url, timeout=300) as client:
        for dataset, photos in datasets.items():
            scores = {name: Scores() for name in ["bicubic", *models] + ([f"{fc_model} (plain tiles, in process)"] if fc_model else [])}
            for _, photo in tqdm(photos, desc=f"quality {dataset}", leave=False):
                target, small = reduce_4x(photo)
                scores["bicubic"].add(bicubic(small), target)
                body = png(small)
                for model in models:
                    response = client.post(f"/upscale?tile=true&model={model}", content=body,
                                           headers={"content-type": "image/png", "accept": "image/png"})
                    response.raise_for_status()
                    scores[model].add(unpng(response.content), target)
                if plain_fc is not None:
                    plan = tiling.layout(small.shape[1], small.shape[2], overlapping=False)
                    tiles = tiling.cut(small, plan)
                    outputs = np.concatenate([plain_fc.run_batch(tiles[i : i + 64]).images for i in range(0, len(tiles), 64)])
                    scores[f"{fc_model} (plain tiles, in process)"].add(tiling.stitch(outputs, plan), target)
            base = scores["bicubic"].row()[0]
            for name, score in scores.items():
                p, s, band, rest = score.row()
                print(f"| {dataset} | {len(photos)} | {name} | {p:.2f} | {s:.4f} | {p - base:+.2f} | {band:.2f} | {rest:.2f} | {band - rest:+.2f} |")


# ---- throughput ------------------------------------------------------------------------------------------
def throughput(url: str, store: ModelStore, model: str, rounds: int) -> None:
    photo = skimage_photos()[0][1][100:356, 150:406]  # astronaut, 256 x 256
    image = np.ascontiguousarray(photo.transpose(2, 0, 1))
    body = png(image)
    version = store.resolve(model, "latest")
    upscaler = Upscaler(store, model, version, torch.device("cpu"), 64)
    upscaler.setup()
    overlapping = fully_convolutional(store.manifest(model, version)["architecture"]["name"])
    plan = tiling.layout(256, 256, overlapping)
    megapixels = 1024 * 1024 / 1e6
    service, in_process = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post(f"/upscale?tile=true&model={model}", content=body, headers={"content-type": "image/png", "accept": "image/png"})
        for _ in tqdm(range(rounds), desc="throughput", leave=False):
            started = time.perf_counter()
            response = client.post(f"/upscale?tile=true&model={model}", content=body, headers={"content-type": "image/png", "accept": "image/png"})
            response.raise_for_status()
            service.append(megapixels / (time.perf_counter() - started))
            started = time.perf_counter()
            tiles = tiling.cut(image, plan)
            outputs = np.concatenate([upscaler.run_batch(tiles[i : i + 64]).images for i in range(0, len(tiles), 64)])
            result = tiling.stitch(outputs, plan)
            in_process.append(megapixels / (time.perf_counter() - started))
    assert unpng(response.content).shape == result.shape
    print(f"\n## Throughput: one 256x256 image -> 1024x1024 with {model} v{version} ({plan.tiles} {'overlapping' if overlapping else 'plain'} tiles), "
          f"median of {rounds} interleaved rounds\n")
    print("| path | output MP/s | tiles/s | s per image |")
    print("|---|---|---|---|")
    for label, values in [("service (HTTP, PNG in/out, batcher)", service), ("in process (cut, run_batch x64, stitch)", in_process)]:
        mps = statistics.median(values)
        print(f"| {label} | {mps:.3f} | {mps / megapixels * plan.tiles:,.0f} | {megapixels / mps:.2f} |")


# ---- fairness ------------------------------------------------------------------------------------------
async def latency_round(url: str, model: str, small: bytes, large: bytes | None, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    large_done = 0
    stop = time.perf_counter() + seconds
    headers = {"content-type": "image/png", "accept": "image/png"}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=16)) as client:
        async def small_client():
            while time.perf_counter() < stop:
                started = time.perf_counter()
                (await client.post(f"/upscale?model={model}", content=small, headers=headers)).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)

        async def large_client():
            nonlocal large_done
            while time.perf_counter() < stop:
                (await client.post(f"/upscale?tile=true&model={model}", content=large, headers=headers)).raise_for_status()
                large_done += 1

        tasks = [small_client() for _ in range(4)] + ([large_client() for _ in range(2)] if large else [])
        if large:  # the large images first, so every small request arrives behind queued tiles
            big = [asyncio.create_task(t) for t in tasks[4:]]
            await asyncio.sleep(0.3)
            await asyncio.gather(*tasks[:4], *big)
        else:
            await asyncio.gather(*tasks)
    return latencies, large_done


def fairness(capped_url: str, uncapped_url: str, model: str, rounds: int, seconds: float) -> None:
    photo = skimage_photos()[0][1][100:356, 150:406]
    large = png(np.ascontiguousarray(photo.transpose(2, 0, 1)))
    small = png(np.ascontiguousarray(photo[::32, ::32].transpose(2, 0, 1)))
    cells = {"alone": [], "with 256x256 images (share capped at 1/2)": [], "with 256x256 images (uncapped)": []}
    large_counts = {key: 0 for key in cells}
    for _ in tqdm(range(rounds), desc="fairness", leave=False):
        for label, url, big in [("alone", capped_url, None), ("with 256x256 images (share capped at 1/2)", capped_url, large),
                                ("with 256x256 images (uncapped)", uncapped_url, large)]:
            latencies, done = asyncio.run(latency_round(url, model, small, big, seconds))
            cells[label] += latencies
            large_counts[label] += done
    print(f"\n## Small requests next to a large image ({model}; 4 clients of one 8x8 image, 2 clients of 256x256 images; "
          f"{rounds} interleaved rounds of {seconds:g} s)\n")
    print("| small 8x8 requests | requests | p50 ms | p90 ms | p99 ms | large images done |")
    print("|---|---|---|---|---|---|")
    for label, latencies in cells.items():
        q = np.percentile(latencies, [50, 90, 99]) if latencies else [float("nan")] * 3
        print(f"| {label} | {len(latencies)} | {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} | {large_counts[label]} |")


# ---- main ------------------------------------------------------------------------------------------
def server(kind: str, store: Path, model: str, logs: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    env = {"UPGRADER_STORE": str(store), "UPGRADER_WORKERS": "1", "UPGRADER_GRPC_PORT": "0", "UPGRADER_TORCH_THREADS": "1", "UPGRADER_DEFAULT_MODEL": model,
           "UPGRADER_REQUEST_TIMEOUT_S": "300", "UPGRADER_MAX_IMAGE_PIXELS": str(1500 * 1500), "UPGRADER_MAX_REQUEST_PIXELS": str(1500 * 1500),
           "UPGRADER_MAX_BODY_BYTES": str(64 * 1024 * 1024), "UPGRADER_LOG_LEVEL": "WARNING"}
    if kind == "uncapped":  # the same service with a large image's share of a batch uncapped
        command = [sys.executable, "-c", "import sys, service.runtime.batching as b; b.BULK_SHARE = 1.0; from service.__main__ import main; "
                   "main(sys.argv[1:])", "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(ServerSpec(kind, command, env, "/readyz", "/upscale"), port, logs / f"bench-tiling-{kind}.log"), f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=PROJECT_ROOT / "store")
    parser.add_argument("--models", help="comma-separated (default: every model in the store)")
    parser.add_argument("--photos", type=int, default=None, help="first N photos of sr-natural (default: all)")
    parser.add_argument("--datasets", default="skimage.data,sr-natural", help="comma-separated photo sets for the quality table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one fairness round")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: quality,throughput,fairness")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the service runs one torch thread too (UPGRADER_TORCH_THREADS=1)
    store = ModelStore(args.store)
    models = args.models.split(",") if args.models else store.models()
    if not models:
        sys.exit(f"no models in {args.store}: train some first (python -m trainer ... --store {args.store})")

    def val_psnr(name: str) -> float:
        return store.manifest(name, store.resolve(name, "latest"))["metrics"]["model"]["psnr"]

    best = max(models, key=val_psnr)
    fc_models = [m for m in models if fully_convolutional(store.manifest(m, store.resolve(m, "latest"))["architecture"]["name"])]
    skip = set(args.skip.split(","))
    print(f"# bench_tiling: load average {os.getloadavg()}, {os.cpu_count()} cpus, torch {torch.__version__}, store {args.store}")
    for name in models:
        version = store.resolve(name, "latest")
        metrics = store.manifest(name, version)["metrics"]
        print(f"- {name} v{version}: validation PSNR {metrics['model']['psnr']:.2f} dB (bicubic {metrics['bicubic']['psnr']:.2f})")
    logs = PROJECT_ROOT / ".cache"
    logs.mkdir(exist_ok=True)
    capped, capped_url = server("capped", args.store, best, logs)
    uncapped, uncapped_url = server("uncapped", args.store, best, logs)
    with capped, uncapped:
        capped.wait_ready(300)
        uncapped.wait_ready(300)
        if "quality" not in skip:
            loaders = {"skimage.data": skimage_photos, "sr-natural": lambda: sr_natural_photos(args.photos)}
            datasets = {name: loaders[name]() for name in args.datasets.split(",")}
            quality(capped_url, models, datasets, store, fc_models[0] if fc_models else None)
        if "throughput" not in skip:
            throughput(capped_url, store, best, args.rounds)
        if "fairness" not in skip:
            fairness(capped_url, uncapped_url, best, args.rounds, args.seconds)
    print(f"\nload average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
