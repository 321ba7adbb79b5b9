"""In-process inference throughput on CUDA next to the CPU, for bench/gpu_check.sh.

    python bench/gpu_throughput.py --store STORE [--models subpixel_residual,conv] [--seconds 3]

For every model's latest version in the store: images/s of the bare forward pass at batch 64 and
1024 on CUDA (float32 with TF32, and bf16 autocast), of the service's whole batch path
(`service.runtime.upscaler.Upscaler.run_batch`: pinned staging, forward, quantisation, PNG encoding) at
batch 64 on CUDA, and of the same forward at batch 64 on the CPU with one thread (the figure the
issue's >= 1,000 images/s target is about). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from model_store import ModelStore
from service.runtime.upscaler import Upscaler
from upgrader.imaging import downsample


def rate(run, batch: int, seconds: float, sync) -> float:
    run()  # warm-up: cuDNN algorithm choice, lazy allocations
    sync()
    images, start = 0, time.perf_counter()
    while images == 0 or time.perf_counter() - start < seconds:
        run()
        images += batch
    sync()
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--models", default=None, help="comma-separated store names (default: every model in the store)")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    store = ModelStore(args.store)
    names = args.models.split(",") if args.models else store.models()
    cuda = torch.device("cuda")
    sync = torch.cuda.synchronize
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; CPU figures with 1 thread\n")
    print("| model | params | CUDA fp32 b64 | CUDA fp32 b1024 | CUDA bf16 b1024 | service batch path b64 (CUDA) | CPU b64, 1 thread |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        model, manifest = store.load(name, device=cuda)
        row = []
        for batch, amp in [(64, False), (1024, False), (1024, True)]:
            inputs = downsample(torch.rand(batch, 3, 32, 32, device=cuda))
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()

            def forward(inputs=inputs, autocast=autocast):
                with torch.inference_mode(), autocast:
                    model(inputs)

            row.append(rate(forward, batch, args.seconds, sync))
        upscaler = Upscaler(store, name, manifest["version"], cuda, max_batch_images=64)
        upscaler.setup()
        pixels = np.random.default_rng(0).integers(0, 256, (64, 3, 8, 8), dtype=np.uint8)
        row.append(rate(lambda: upscaler.run_batch(pixels), 64, args.seconds, sync))
        torch.set_num_threads(1)
        cpu_model, _ = store.load(name)
        cpu_inputs = downsample(torch.rand(64, 3, 32, 32))

        def cpu_forward():
            with torch.inference_mode():
                cpu_model(cpu_inputs)

        row.append(rate(cpu_forward, 64, args.seconds, lambda: None))
        print(f"| {name}:{manifest['version']} {manifest['architecture'].get('params') or ''} | {manifest.get('parameter_count', 0):,} | "
              + " | ".join(f"{r:,.0f}" for r in row) + " |")


if __name__ == "__main__":
    main()
