"""Where a request's CPU goes: py-spy profiles of this tree's server and a baseline's, under the same load, side by side.

    .venv/bin/python bench/profile_service.py --store STORE --model conv --concurrency 128 --baseline-root CHECKOUT
    .venv/bin/python bench/profile_service.py --store STORE --model conv --concurrency 128 --transport v2    # this tree alone
    .venv/bin/python bench/profile_service.py --store STORE --model conv --concurrency 128 --transport grpc

STORE is a model store holding the model (e.g. one made by bench/bench_service.py's `publish_fresh`, or a copy of
pretrained/ for `upgrader`); CHECKOUT a checkout of the baseline tree (`git worktree add --detach DIR REF`).
`--transport v2` sends each request as one binary UINT8 [1, 3, 8, 8] tensor to /v2/models/MODEL/infer (what
perf_analyzer sends), `--transport grpc` as a gRPC ModelInfer, both from bench/overload.py's closed-loop clients.

Besides the functions, every sample is put in one layer by the innermost frame that names one (`LAYERS`: the
server's protocol, the framework and routing, each middleware, the OIP's parsing and encoding, the hand-off to the
batcher, the forward, the PNG/tensor encoding, the event loop), and the table of layers gives each one's CPU per
1,000 requests.

Each tree runs one worker (`batched` and `base` of bench/bench_service.py), one after the other, driven by that
script's closed-loop generator (one 8x8 PNG per request). After the warm-up, py-spy samples the worker for
`--seconds`; every function's self samples are then counted per 1,000 requests served, so the two trees compare
even when their request rates differ. The table lists the functions whose cost differs most, by name (a module
moved between the trees still matches), with the total per 1,000 requests on top. Needs py-spy (`.[bench]`) and
the permission to read another process's memory (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service  # noqa: E402  (the servers and the load generator)

PY_SPY = Path(sys.executable).with_name("py-spy")
SAMPLE_HZ = 200


def self_samples(collapsed: Path) -> collections.Counter:
    """py-spy's raw output (`frame;frame;... count`) -> samples per function name, counted where it was the leaf."""
    counts: collections.Counter = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        counts[re.sub(r" \(.*\)$", "", leaf)] += int(count)
    return counts


# (layer, path fragments): a sample belongs to the first layer, scanning its stack from the innermost frame out,
# whose fragment appears in a frame's file. The order of the rows is the order of the table.
LAYERS = [
    ("forward (torch, OpenVINO)", ("torch/", "openvino/", "service/runtime/upscaler.py", "service/runtime/openvino_forward.py")),
    ("encode outputs (PNG, tensors)", ("service/runtime/codec.py", "service/runtime/formats.py", "PIL/", "torchcodec/")),
    ("batcher hand-off and batching", ("service/runtime/batching.py", "service/runtime/admission.py", "service/runtime/pipeline.py",
                                       "service/runtime/registry.py")),
    ("OIP parse and answer", ("service/oip/", "service/api/routes/inference.py", "pydantic", "json/")),
    ("/upscale route and bodies", ("service/api/routes/upscale.py", "service/api/bodies.py", "service/api/multipart.py",
                                   "service/api/schemas.py", "multipart/")),
    ("middleware: request id and access log", ("service/observability/logs.py", "logging/")),
    ("middleware: admission, keys, body limit, disconnect", ("service/http/",)),
    ("metrics", ("service/observability/metrics.py", "prometheus_client/")),
    ("framework and routing (FastAPI, Starlette)", ("fastapi/", "starlette/", "anyio/")),
    ("gRPC server (grpc.aio) and protobuf", ("grpc/", "google/protobuf", "service/grpc/")),
    ("HTTP server protocol (uvicorn, httptools)", ("uvicorn/", "httptools/", "h11/")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/", "selectors.py")),
    # A pool thread waiting for work: py-spy counts its blocking queue get as running, so it is kept apart.
    ("helper threads waiting for work", ("concurrent/", "threading.py", "queue.py")),
]
OTHER = "other"


def layer_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        where = frame.rpartition(" (")[2]
        for layer, fragments in LAYERS:
            if any(fragment in where for fragment in fragments):
                return layer
    return OTHER


def layer_samples(collapsed: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        counts[layer_of(stack)] += int(count)
    return counts


class NoRss:  # bench/overload.py's drivers sample the server's memory; not measured here
    def rss_mb(self) -> dict:
        return {}


def profile(kind: str, args, pngs: list[bytes], workdir: Path) -> tuple[collections.Counter, collections.Counter, float]:
    """Run one server under load, sample it; -> (self samples per function, samples per layer, requests per second)."""
    port = bench_service.free_port()
    spec = bench_service.server_spec(kind, args.model, args.store, port, 1, args.max_wait_ms, "codec", args.baseline_root)
    if args.transport == "grpc":
        spec.env["UPGRADER_GRPC_PORT"] = str(grpc_port := bench_service.free_port())
    output = workdir / f"{kind}.txt"
    with bench_service.ServerProcess(spec, port, workdir / f"{kind}.log") as server:
        server.wait_ready(args.ready_timeout)
        if args.transport == "upscale":
            load = bench_service.LoadRun(port, spec.upscale_path, pngs, args.concurrency, args.warmup, args.seconds + 1, 30.0)
            measure = lambda: load.run(server.proc.pid)  # noqa: E731
            served = lambda: len(load.latencies)  # noqa: E731
        else:
            import overload

            overload.MODEL = args.model
            phase = overload.Phase(kind, "profile", args.concurrency, args.seconds + 1)
            if args.transport == "v2":
                payload = overload.v2_request(port, pngs[:1])

                async def measure():
                    await overload.drive(port, payload, args.concurrency, args.warmup, overload.Phase(kind, "warmup", 1, 1), "retry-after", NoRss())
                    await overload.drive(port, payload, args.concurrency, args.seconds + 1, phase, "retry-after", NoRss())
            else:
                payload = overload.grpc_request(pngs[:1])

                async def measure():
                    await overload.drive_grpc(grpc_port, payload, args.concurrency, args.warmup, overload.Phase(kind, "warmup", 1, 1), "retry-after", NoRss())
                    await overload.drive_grpc(grpc_port, payload, args.concurrency, args.seconds + 1, phase, "retry-after", NoRss())
            served = lambda: phase.ok  # noqa: E731

        async def run() -> None:
            measured = asyncio.create_task(measure())
            await asyncio.sleep(args.warmup + 0.5)
            spy = await asyncio.create_subprocess_exec(
                str(PY_SPY), "record", "--pid", str(server.proc.pid), "--rate", str(SAMPLE_HZ), "--duration", str(args.seconds),
                "--format", "raw", "--nonblocking", "--output", str(output),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await measured
            if await spy.wait() != 0:
                raise SystemExit(f"py-spy failed on the {kind} server (run as root, or set kernel.yama.ptrace_scope=0)")

        asyncio.run(run())
        print(f"{kind} ({args.transport}): {served() / (args.seconds + 1):.1f} req/s", flush=True)
    return self_samples(output), layer_samples(output), served() / (args.seconds + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="a model store holding --model")
    parser.add_argument("--model", default="conv")
    parser.add_argument("--baseline-root", type=Path, help="checkout of the baseline tree (git worktree add --detach); none: this tree alone")
    parser.add_argument("--transport", choices=["upscale", "v2", "grpc"], default="upscale")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=int, default=10, help="sampled seconds per server")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--top", type=int, default=30, help="rows: the functions whose cost per request differs most")
    parser.add_argument("--data", type=Path, default=bench_service.DEFAULT_DATA)
    args = parser.parse_args()
    _, pngs = bench_service.load_images(args.data, 256)
    kinds = ("batched", "base") if args.baseline_root else ("batched",)
    with tempfile.TemporaryDirectory(prefix="upgrader-profile-") as tmp:
        per_1000, layers = {}, {}
        for kind in kinds:
            counts, by_layer, rps = profile(kind, args, pngs, Path(tmp))
            scale = 1000 / (rps * args.seconds)
            per_1000[kind] = {name: n * scale for name, n in counts.items()}
            layers[kind] = {name: n * scale for name, n in by_layer.items()}
    ms = 1000 / SAMPLE_HZ  # one sample stands for this many ms of CPU
    names = {"batched": "this tree", "base": "baseline"}
    print(f"\nCPU-ms per 1,000 requests by layer ({args.transport}, {args.model}, c = {args.concurrency}; one sample = {ms:g} ms):")
    print("| layer | " + " | ".join(names[k] for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for layer in [name for name, _ in LAYERS] + [OTHER, "total"]:
        cells = [sum(layers[k].values()) if layer == "total" else layers[k].get(layer, 0.0) for k in kinds]
        print(f"| {layer} | " + " | ".join(f"{c * ms:.0f}" for c in cells) + " |")
    ours, base = per_1000["batched"], per_1000.get("base", {})
    print(f"\nsamples per 1,000 requests: this tree {sum(ours.values()):.1f}" + (f", baseline {sum(base.values()):.1f}" if base else ""))
    print(f"{'this tree':>10} {'baseline':>9} {'diff':>7}  function (self samples)")
    order = sorted(set(ours) | set(base), key=lambda name: -abs(ours.get(name, 0) - base.get(name, 0)))
    for name in order[:args.top]:
        a, b = ours.get(name, 0.0), base.get(name, 0.0)
        print(f"{a:10.1f} {b:9.1f} {a - b:+7.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
