"""Closed-loop HTTP benchmark of the upscaling service against its baselines.

    .venv/bin/python bench/bench_service.py                      # conv + resnet18, c = 1, 8, 32, 128
    .venv/bin/python bench/bench_service.py --models resnet18 --concurrency 32 --duration 10 --json out.json

For each model it publishes freshly initialised (seeded) weights into a temporary store (or uses
`--store DIR`), then starts, as real subprocesses on free loopback ports (all up at once, each
paused with SIGSTOP while another is measured, cells alternating between them):

  batched   this service, default dynamic batching (UPGRADER_MAX_BATCH_IMAGES=64, MAX_WAIT_MS=2), one process
            (UPGRADER_WORKERS=1)
  batched2  the same with UPGRADER_WORKERS=2 (the service's default on a CPU with 2+ cores): two uvicorn
            worker processes, each with its batcher (LitServe also runs two: HTTP server, inference worker)
  batch1    this service with UPGRADER_MAX_BATCH_IMAGES=1, one process (no batching: the in-run baseline)
  traced2   batched2 with tracing on (OTEL_EXPORTER_OTLP_ENDPOINT), exporting every span to a sink process
            that answers each OTLP/HTTP export 200: what tracing costs (batched2 is the same with it off)
  base, base2  batched and batched2 run from another checkout (`--baseline-root DIR`, e.g. a
            `git worktree add --detach` of main): the code before a change, measured in the same run
  litserve  bench/litserve_server.py: LitServe's own batching (max_batch_size=64, batch_timeout=2 ms),
            same weights from the same store, same PNG-in / base64-PNG-out JSON contract, same
            PNG codec (service.runtime.codec; `--litserve-codec pil` for Pillow's)

and drives each with the same load generator: `concurrency` keep-alive connections, each sending
one real 8x8 PNG (CIFAR-10 test images reduced to 8x8) and waiting for the answer before the
next (closed loop), warm-up then a fixed measured window. The generator is a raw HTTP/1.1 client
on asyncio (uvloop when present): it shares the 2 CPU cores with the servers, so it is kept as
cheap as Python allows and its CPU use is reported. Every cell also reports the CPU the server's
process tree used and the CPU everything else on the machine used (other agents), so a slow cell
can be told apart from a contended one.

`batch` is the mean over responses of `metrics.batch_size` (how many images were in the batch each
request rode in; request-weighted, so it reads higher than a per-batch mean). LitServe reports it
the same way from inside its batched `predict`. `inf ms` is the mean `metrics.inference_ms`: for our
service the batch's wall time on its worker thread (forward + PNG encode, GIL waits included), for
LitServe the forward alone. `req/cpu-s` (req/s per core the server used) is the column to compare
when other tenants load the machine; `--autogroup-nice -10` approximates a dedicated machine.

The in-process ceiling is PNG decode + forward at batch 64 + PNG encode with no HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from model_store import ModelStore
from upgrader.architectures import INPUT_SHAPE, INPUT_SIZE, OUTPUT_SHAPE, build_model, parameter_count
from upgrader.imaging import bicubic_upscale, psnr_per_image, ssim_per_image, to_float

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("UPGRADER_DATA", PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
SERVERS = ("batched", "batched2", "batch1", "traced2", "litserve", "base", "base2")
# The OTLP/HTTP sink of the traced2 server: accepts every export (an empty ExportTraceServiceResponse is an empty body).
OTLP_SINK = """
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200); self.send_header("content-type", "application/x-protobuf"); self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""
_sink_port: list[int] = []


def otlp_sink_url() -> str:
    """The OTLP/HTTP sink, started on first use as a process of its own (it lives as long as this one)."""
    if not _sink_port:
        port = free_port()
        subprocess.Popen([sys.executable, "-c", OTLP_SINK, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        _sink_port.append(port)
    return f"http://127.0.0.1:{_sink_port[0]}"
OUR_BATCHED = ("batched", "batched2")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- inputs and models ---------------------------------------------------------------------------


def load_images(data_dir: Path, count: int) -> tuple[torch.Tensor, list[bytes]]:
    """`count` real 32x32 test images, round-robin over classes; returns (uint8 Nx3x32x32, 8x8 PNG bytes)."""
    test_dir = data_dir / "test"
    if not test_dir.is_dir():
        sys.exit(f"CIFAR-10 copy not found at {data_dir} (set UPGRADER_DATA)")
    per_class = [sorted(d.glob("*.jpg")) for d in sorted(test_dir.iterdir()) if d.is_dir()]
    files = [f for group in zip(*per_class) for f in group][:count]
    images = [Image.open(f).convert("RGB") for f in files]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        # PIL's bilinear reduction is what torchvision's Resize(8) does: the trainer's low-res inputs.
        image.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    targets = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()
    return targets, pngs


def decode_png(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def to_pixels(batch: torch.Tensor) -> np.ndarray:
    """float Nx3xHxW in [0, 1] -> uint8 NxHxWx3 (rounded, as the service quantises)."""
    return batch.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def publish_fresh(store: ModelStore, name: str, seed: int, targets: torch.Tensor, pngs: list[bytes]) -> int:
    """Publish a seeded, untrained `name` with the manifest contract; metrics are measured on the bench images."""
    torch.manual_seed(seed)
    model = build_model(name).eval()
    inputs = to_float(torch.stack([decode_png(p) for p in pngs]))
    reference = to_float(targets)
    with torch.inference_mode():
        outputs = model(inputs)
    bicubic = bicubic_upscale(inputs)

    def scores(images: torch.Tensor) -> dict:
        mse = (images - reference).pow(2).mean().item()
        return {"mse": mse, "psnr": psnr_per_image(images, reference).mean().item(), "ssim": ssim_per_image(images, reference).mean().item()}

    manifest = {
        "architecture": {"name": name, "params": {}},
        "parameter_count": parameter_count(model),
        "input_shape": list(INPUT_SHAPE),
        "output_shape": list(OUTPUT_SHAPE),
        "recipe": {"note": f"untrained: torch.manual_seed({seed}) initialisation, published by bench/bench_service.py"},
        "args": {"seed": seed},
        "dataset": {"name": "cifar10-jpeg", "fingerprint": "bench-images", "train_size": 0, "val_size": len(pngs)},
        "history": [],
        "metrics": {"model": scores(outputs), "bicubic": scores(bicubic), "images": len(pngs)},
        "device": "cpu",
        "wall_time_s": 0.0,
        "torch_version": torch.__version__,
        "epochs_completed": 0,
    }
    return store.publish(name, model.state_dict(), manifest)


# ---- server processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerSpec:
    kind: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    upscale_path: str
    cwd: Path = PROJECT_ROOT


def server_spec(kind: str, model: str, store: Path, port: int, threads: int, max_wait_ms: float, litserve_codec: str,
                baseline_root: Path | None = None) -> ServerSpec:
    python = sys.executable
    if kind == "litserve":
        command = [python, str(PROJECT_ROOT / "bench" / "litserve_server.py"), "--store", str(store), "--model", model,
                   "--port", str(port), "--threads", str(threads), "--max-batch-size", "64", "--batch-timeout", str(max_wait_ms / 1000),
                   "--codec", litserve_codec]
        return ServerSpec(kind, command, {}, "/health", "/predict")
    env = {
        "UPGRADER_STORE": str(store),
        "UPGRADER_DEFAULT_MODEL": model,
        "UPGRADER_TORCH_THREADS": str(threads),
        "UPGRADER_MAX_WAIT_MS": str(max_wait_ms),
        "UPGRADER_GRPC_PORT": "0",  # HTTP is measured here; several servers run at once
        "UPGRADER_MAX_BATCH_IMAGES": "1" if kind == "batch1" else "64",
        "UPGRADER_WORKERS": "2" if kind in ("batched2", "base2", "traced2") else "1",  # explicit: the service's default depends on the machine
    }
    if kind == "traced2":
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_sink_url(), OTEL_SERVICE_NAME="upgrader-bench")
    command = [python, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    if kind in ("base", "base2"):
        if baseline_root is None:
            raise SystemExit(f"server {kind} needs --baseline-root")
        env["PYTHONPATH"] = str(baseline_root)
        return ServerSpec(kind, command, env, "/readyz", f"/upscale?model={model}", baseline_root)
    return ServerSpec(kind, command, env, "/readyz", f"/upscale?model={model}")


class ServerProcess:
    """A server subprocess in its own session (so its workers can be stopped with it), logs to a file."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec, self.port, self.log_path = spec, port, log_path

    def __enter__(self) -> "ServerProcess":
        self.log = open(self.log_path, "wb")
        env = {**os.environ, **self.spec.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.spec.command, cwd=self.spec.cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> float:
        start = time.perf_counter()
        url = f"http://127.0.0.1:{self.port}{self.spec.ready_path}"
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.kind} server exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            time.sleep(0.25)
        raise RuntimeError(f"{self.spec.kind} server not ready at {url} after {timeout:.0f}s:\n{self.log_tail()}")

    def pause(self) -> None:
        """SIGSTOP the whole session: an idle server still burns CPU (LitServe's workers poll their
        queues) that would be taken from the server being measured."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def set_autogroup_nice(self, nice: int) -> None:
        Path(f"/proc/{self.proc.pid}/autogroup").write_text(str(nice))

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        # SIGTERM lets uvicorn / LitServe shut down gracefully; anything left of the session is killed.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.resume()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()


def process_tree_cpu_s(root_pid: int) -> float:
    """user + system CPU seconds of `root_pid` and all its live descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


# ---- load generator ------------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.IGNORECASE)


@dataclass
class CellResult:
    model: str
    concurrency: int
    server: str
    duration_s: float
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    mean_batch: float | None = None
    inference_ms: float | None = None  # mean `metrics.inference_ms`: the batch's forward (+ encode) as the server timed it
    errors: int = 0
    error_samples: dict[str, int] = field(default_factory=dict)
    server_cpu: float = 0.0  # cores used by the server's process tree during the window
    client_cpu: float = 0.0  # cores used by this load generator
    other_cpu: float = 0.0  # cores used by everything else on the machine
    loadavg_1m: float = 0.0
    round: int = 0  # -1: the median over several rounds


class LoadRun:
    """Closed loop: `concurrency` connections, each sends the next PNG as soon as its last answer arrived."""

    def __init__(self, port: int | list[int], path: str, pngs: list[bytes], concurrency: int, warmup_s: float, duration_s: float,
                 timeout_s: float) -> None:
        self.ports = [port] if isinstance(port, int) else list(port)  # several: connection i goes to ports[i % n] (replicas)
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: "
        self.requests = [head.encode() + f"{len(p)}\r\n\r\n".encode() + p for p in pngs]
        self.concurrency = concurrency
        self.warmup_s, self.duration_s, self.timeout_s = warmup_s, duration_s, timeout_s
        self.latencies: list[float] = []
        self.batch_sizes: list[int] = []
        self.inference_ms: list[float] = []
        self.errors: dict[str, int] = {}
        self.error_count = 0

    def error(self, message: str) -> None:
        self.errors[message] = self.errors.get(message, 0) + 1
        self.error_count += 1

    async def run(self, server_pid: int | list[int]) -> dict:
        # perf_counter throughout: uvloop's loop.time() only ticks in milliseconds.
        self.t_measure = time.perf_counter() + self.warmup_s
        self.t_end = self.t_measure + self.duration_s
        workers = [asyncio.create_task(self.worker(i)) for i in range(self.concurrency)]
        usage = asyncio.create_task(self.sample_usage(server_pid))
        done, pending = await asyncio.wait(workers, timeout=self.warmup_s + self.duration_s + self.timeout_s)
        for task in pending:  # a request stuck past the deadline: a server that hangs is a failure
            task.cancel()
            self.error(f"no response within {self.timeout_s:.0f}s after the run ended")
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self.error(f"client error: {task.exception()!r}")
        return await usage

    async def sample_usage(self, server_pid: int | list[int]) -> dict:
        pids = [server_pid] if isinstance(server_pid, int) else server_pid

        def servers_cpu_s() -> float:
            return sum(process_tree_cpu_s(pid) for pid in pids)

        await asyncio.sleep(self.t_measure - time.perf_counter())
        before = (servers_cpu_s(), time.process_time(), machine_busy_s(), time.perf_counter())
        await asyncio.sleep(max(0.0, self.t_end - time.perf_counter()))
        after = (servers_cpu_s(), time.process_time(), machine_busy_s(), time.perf_counter())
        wall = after[3] - before[3]
        server, client, busy = ((a - b) / wall for a, b in zip(after[:3], before[:3]))
        return {"server_cpu": server, "client_cpu": client, "other_cpu": max(0.0, busy - server - client), "loadavg_1m": os.getloadavg()[0]}

    async def worker(self, index: int) -> None:
        port = self.ports[index % len(self.ports)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = index  # connections start at different images
        try:
            while time.perf_counter() < self.t_end:
                request = self.requests[sent % len(self.requests)]
                sent += self.concurrency
                start = time.perf_counter()
                writer.write(request)
                try:
                    status, body, close = await self.read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.error(f"connection error: {exc!r}")
                    close = True
                    status, body = 0, b""
                finished = time.perf_counter()
                if status == 200:
                    self.record(start, finished, body)
                elif status:
                    self.error(f"HTTP {status}: {body[:200].decode(errors='replace')}")
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    @staticmethod
    async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            raise ValueError(f"response without Content-Length: {head[:200]!r}")
        body = await reader.readexactly(int(length.group(1)))
        return int(head[9:12]), body, _CONNECTION_CLOSE.search(head) is not None

    def record(self, start: float, finished: float, body: bytes) -> None:
        try:
            payload = json.loads(body)
            images = payload["images"]
            if len(images) != 1 or not images[0]["png"]:
                raise ValueError(f"expected one image, got {len(images)}")
            batch_size = payload["metrics"]["batch_size"]
            inference_ms = payload["metrics"].get("inference_ms")
        except (ValueError, KeyError, TypeError) as exc:
            self.error(f"bad 200 response ({exc!r}): {body[:200].decode(errors='replace')}")
            return
        if self.t_measure <= finished <= self.t_end:  # only answers that arrived inside the measured window
            self.latencies.append(finished - start)
            self.batch_sizes.append(batch_size)
            if inference_ms is not None:
                self.inference_ms.append(inference_ms)


def run_cell(server: ServerProcess, model: str, pngs: list[bytes], concurrency: int, args) -> CellResult:
    load = LoadRun(server.port, server.spec.upscale_path, pngs, concurrency, args.warmup, args.duration, args.timeout)
    usage = asyncio.run(load.run(server.proc.pid))
    result = CellResult(model, concurrency, server.spec.kind, args.duration, errors=load.error_count, error_samples=load.errors, **usage)
    if load.latencies:
        latencies_ms = np.array(load.latencies) * 1000
        result.requests = len(latencies_ms)
        result.rps = len(latencies_ms) / args.duration
        result.p50_ms, result.p99_ms = (float(v) for v in np.percentile(latencies_ms, [50, 99]))
        result.mean_ms = float(latencies_ms.mean())
        result.mean_batch = statistics.fmean(load.batch_sizes)
        result.inference_ms = statistics.fmean(load.inference_ms) if load.inference_ms else None
    return result


def check_outputs(server: ServerProcess, model: torch.nn.Module, pngs: list[bytes]) -> str | None:
    """One request per image of a few: the served PNG must equal the local model's output (±1 level)."""
    worst = 0
    for png in pngs[:4]:
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}{server.spec.upscale_path}", data=png, headers={"Content-Type": "image/png"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["images"][0]["png"]))).convert("RGB")).astype(int)
        with torch.inference_mode():
            expected = to_pixels(model(to_float(decode_png(png)[None])))[0].astype(int)
        if served.shape != expected.shape:
            return f"served image is {served.shape}, expected {expected.shape}"
        worst = max(worst, int(np.abs(served - expected).max()))
    return None if worst <= 1 else f"served pixels differ from the local model output by up to {worst}/255"


# ---- in-process ceiling --------------------------------------------------------------------------


def ceiling_codec() -> tuple[str, Callable[[list[bytes]], torch.Tensor], Callable[[torch.Tensor], list[bytes]]]:
    """(name, PNGs -> uint8 Nx3x8x8, float outputs -> PNGs): the service's own codec when it is
    importable (what the service pays per image), else Pillow."""
    try:
        from service.runtime import codec
    except ImportError:
        return "PIL", lambda pngs: torch.stack([decode_png(p) for p in pngs]), lambda outputs: [encode_png(p) for p in to_pixels(outputs)]

    def decode(pngs: list[bytes]) -> torch.Tensor:
        return torch.from_numpy(codec.stack_images([codec.decode_image(png, INPUT_SIZE, item) for item, png in enumerate(pngs)]))

    def encode(outputs: torch.Tensor) -> list[bytes]:
        return [codec.encode_png(image) for image in codec.quantize(outputs).numpy()]

    return "service.runtime.codec", decode, encode


def ceiling(model: torch.nn.Module, pngs: list[bytes], batch: int, seconds: float) -> float:
    """Images/s of decode + forward at `batch` + encode (+ base64), no HTTP, on this process's torch threads."""
    _, decode, encode = ceiling_codec()
    chunks = [pngs[i:i + batch] for i in range(0, len(pngs) - batch + 1, batch)]
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or images == 0:
        chunk = chunks[(images // batch) % len(chunks)]
        with torch.inference_mode():
            encoded = [base64.b64encode(png) for png in encode(model(to_float(decode(chunk))))]
        images += len(encoded)
    return images / (time.perf_counter() - start)


# ---- report --------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def print_table(results: list[CellResult]) -> None:
    header = f"{'model':<9}{'conc':>5} {'server':<9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'inf ms':>8}{'errors':>7}{'srv cpu':>8}{'cli cpu':>8}{'other':>7}{'load1':>6}{'req/cpu-s':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.model:<9}{r.concurrency:>5} {r.server:<9}{fmt(r.rps):>8}{fmt(r.p50_ms, 2):>9}{fmt(r.p99_ms, 2):>9}{fmt(r.mean_batch):>7}"
              f"{fmt(r.inference_ms, 2):>8}{r.errors:>7}{fmt(r.server_cpu, 2):>8}{fmt(r.client_cpu, 2):>8}{fmt(r.other_cpu, 2):>7}{fmt(r.loadavg_1m, 2):>6}"
              f"{fmt(r.rps / r.server_cpu if r.server_cpu else None, 0):>10}")


def target_lines(results: list[CellResult], concurrency: int = 32) -> list[dict]:
    cells = {(r.model, r.concurrency, r.server): r for r in results}
    targets = []

    def add(label: str, ours: CellResult | None, base: CellResult | None, value, goal: str, met) -> None:
        if ours is None or base is None or not ours.requests or not base.requests:
            return
        targets.append({"target": label, "value": value(ours, base), "goal": goal, "met": met(value(ours, base))})

    add(f"resnet18 c={concurrency}: batched / batch1 throughput", cells.get(("resnet18", concurrency, "batched")),
        cells.get(("resnet18", concurrency, "batch1")), lambda a, b: a.rps / b.rps, ">= 3.0x", lambda v: v >= 3.0)
    for model in sorted({r.model for r in results}):
        for kind in OUR_BATCHED:
            ours, lit = cells.get((model, concurrency, kind)), cells.get((model, concurrency, "litserve"))
            add(f"{model} c={concurrency}: {kind} / LitServe throughput", ours, lit, lambda a, b: a.rps / b.rps, ">= 1.3x", lambda v: v >= 1.3)
            add(f"{model} c={concurrency}: {kind} / LitServe p99", ours, lit, lambda a, b: a.p99_ms / b.p99_ms, "<= 1.0x", lambda v: v <= 1.0)
    return targets


def boost_own_session(nice: int) -> None:
    """Move this process into a session of its own and raise that autogroup (never the caller's shared one)."""
    try:
        os.setsid()
    except OSError:  # a process-group leader (started from an interactive shell) cannot: boost only the servers
        print("note: cannot leave the caller's session; only the servers' sessions are boosted", flush=True)
        return
    Path("/proc/self/autogroup").write_text(str(nice))
    print(f"scheduling: this load generator and every server run in {Path('/proc/self/autogroup').read_text().split()[-2:]}", flush=True)


def start_servers(stack: contextlib.ExitStack, name: str, model: torch.nn.Module, store: ModelStore, pngs: list[bytes],
                  log_dir: Path, args, checks: dict[str, str]) -> list[ServerProcess]:
    """Start every server kind for `name` at once, wait until each is ready and serves the right pixels."""
    started = []
    for kind in args.servers:
        port = free_port()
        spec = server_spec(kind, name, store.root, port, args.threads, args.max_wait_ms, args.litserve_codec, args.baseline_root)
        started.append(stack.enter_context(ServerProcess(spec, port, log_dir / f"{name}-{kind}.log")))
    ready = []
    for server in started:
        key = f"{name}/{server.spec.kind}"
        try:
            ready_s = server.wait_ready(args.ready_timeout)
        except RuntimeError as exc:
            print(f"!! {exc}", flush=True)
            checks[key] = str(exc).splitlines()[0]
            continue
        if args.autogroup_nice:
            server.set_autogroup_nice(args.autogroup_nice)
        checks[key] = check_outputs(server, model, pngs) or "ok"
        print(f"{server.spec.kind}: ready after {ready_s:.1f}s on :{server.port}, outputs: {checks[key]}", flush=True)
        ready.append(server)
    time.sleep(1.0)  # let start-up work settle, then see what each server burns while idle
    before = [process_tree_cpu_s(s.proc.pid) for s in ready]
    time.sleep(2.0)
    idle = [(process_tree_cpu_s(s.proc.pid) - b) / 2.0 for s, b in zip(ready, before)]
    print("idle cpu (cores): " + ", ".join(f"{s.spec.kind} {c:.3f}" for s, c in zip(ready, idle))
          + "; servers not being measured are paused (SIGSTOP)", flush=True)
    for server in ready:
        server.pause()
    return ready


def summarise(results: list[CellResult]) -> list[CellResult]:
    """One row per (model, concurrency, server): the median of each measure over rounds, errors summed."""
    groups: dict[tuple, list[CellResult]] = {}
    for r in results:
        groups.setdefault((r.model, r.concurrency, r.server), []).append(r)
    summary = []
    for (model, concurrency, server), rows in groups.items():
        row = CellResult(model, concurrency, server, rows[0].duration_s, round=-1 if len(rows) > 1 else rows[0].round)
        for measure in ("requests", "rps", "p50_ms", "p99_ms", "mean_ms", "mean_batch", "inference_ms", "server_cpu", "client_cpu", "other_cpu", "loadavg_1m"):
            values = [getattr(r, measure) for r in rows if getattr(r, measure) is not None]
            setattr(row, measure, statistics.median(values) if values else None)
        row.errors = sum(r.errors for r in rows)
        for r in rows:
            for message, count in r.error_samples.items():
                row.error_samples[message] = row.error_samples.get(message, 0) + count
        summary.append(row)
    return summary


# ---- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="conv,resnet18", help="comma-separated architectures / store model names")
    parser.add_argument("--concurrency", default="1,8,32,128", help="comma-separated closed-loop connection counts")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every cell this many times (servers rotated) and report medians")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may still take after a cell ends")
    parser.add_argument("--store", type=Path, default=None, help="use the latest versions in this store instead of fresh seeded models")
    # 1 by default: on 2 shared cores a second OpenMP thread spins against the HTTP layer and the
    # other tenants, and a forward pass gets 10-25x slower (measured: conv@64 13 ms -> 354 ms).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every server and the ceiling")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="batch fill wait for our service and LitServe")
    parser.add_argument("--litserve-codec", choices=("service", "pil"), default="service",
                        help="PNG codec inside LitServe: our service's (compares the serving machinery) or Pillow's")
    parser.add_argument("--images", type=int, default=256, help="distinct real test images to cycle through")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of the fresh models")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per in-process ceiling measurement (0: skip)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 copy with a test/ folder")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds a server may take to become ready")
    parser.add_argument("--autogroup-nice", type=int, default=0,
                        help="Linux shares CPU between sessions (autogroups): on a box loaded by other tenants the servers get a "
                             "fraction of a core each and the run measures the scheduler. A negative value (e.g. -10, needs root) "
                             "raises the bench's and the servers' sessions, approximating a dedicated machine; it takes CPU from "
                             "the other tenants for the run. 0 (default): leave scheduling alone")
    parser.add_argument("--baseline-root", type=Path, default=None, help="checkout the base/base2 servers run from (the code before a change)")
    parser.add_argument("--json", type=Path, default=None, help="write every result to this JSON file")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    return args


def main() -> None:
    args = parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    torch.set_num_threads(args.threads)
    if args.autogroup_nice:
        boost_own_session(args.autogroup_nice)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}, "
          f"{args.duration:g}s measured + {args.warmup:g}s warm-up per cell", flush=True)
    targets, pngs = load_images(args.data, args.images)

    results: list[CellResult] = []
    ceilings: dict[str, float] = {}
    checks: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        store = ModelStore(args.store or Path(tmp) / "store")
        if args.store is None:
            for name in args.models:
                print(f"published fresh {name} v{publish_fresh(store, name, args.seed, targets, pngs)} into {store.root}", flush=True)
        for name in args.models:
            model, manifest = store.load(name)
            print(f"\n== {name} v{manifest['version']} ({manifest['parameter_count']:,} parameters)", flush=True)
            if args.ceiling_seconds > 0:
                ceilings[name] = ceiling(model, pngs, 64, args.ceiling_seconds)
                print(f"in-process ceiling ({ceiling_codec()[0]} decode + forward@64 + encode): {ceilings[name]:.0f} images/s", flush=True)
            with contextlib.ExitStack() as stack:
                servers = start_servers(stack, name, model, store, pngs, Path(tmp), args, checks)
                # All servers stay up (paused while not measured) and the cells alternate between
                # them, so the contention from other tenants, which drifts over minutes, hits all alike.
                for round_index in range(args.rounds):
                    for concurrency in args.concurrency:
                        for server in servers[round_index % len(servers):] + servers[:round_index % len(servers)]:
                            server.resume()
                            try:
                                result = run_cell(server, name, pngs, concurrency, args)
                            finally:
                                server.pause()
                            result.round = round_index
                            results.append(result)
                            print(f"  {server.spec.kind:<9}c={concurrency:<4} {result.rps:8.1f} req/s  p50 {fmt(result.p50_ms, 2)} ms  "
                                  f"p99 {fmt(result.p99_ms, 2)} ms  batch {fmt(result.mean_batch)}  inference {fmt(result.inference_ms, 2)} ms  errors {result.errors}  cpu srv/cli/other "
                                  f"{result.server_cpu:.2f}/{result.client_cpu:.2f}/{result.other_cpu:.2f}", flush=True)
                            for message, count in result.error_samples.items():
                                print(f"    {count} x {message}", flush=True)

    summary = summarise(results)
    print(f"\n{'median of ' + str(args.rounds) + ' rounds; ' if args.rounds > 1 else ''}cpu columns are cores: srv = the server's "
          "process tree, cli = this load generator, other = everything else on the machine; req/cpu-s = req/s per server core "
          "(less sensitive to contention than req/s)")
    print_table(summary)
    if ceilings:
        print("\nin-process ceiling, images/s (PNG decode + forward at batch 64 + PNG encode, no HTTP): "
              + ", ".join(f"{name} {value:.0f}" for name, value in ceilings.items()))
    goals = target_lines(summary)
    if goals:
        print()
        for goal in goals:
            print(f"{goal['target']:<48} {goal['value']:6.2f}x  (target {goal['goal']})  {'MET' if goal['met'] else 'MISSED'}")
    errors = sum(r.errors for r in results)
    bad_checks = {k: v for k, v in checks.items() if v != "ok"}
    print(f"\nerrors: {errors}" + (f"; output checks failed: {bad_checks}" if bad_checks else "") + f"; load average now {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "results": [asdict(r) for r in summary], "rounds": [asdict(r) for r in results],
                                         "ceiling_images_per_s": ceilings,
                                         "targets": goals, "checks": checks}, indent=2))
        print(f"results written to {args.json}")
    sys.exit(1 if errors or bad_checks else 0)


if __name__ == "__main__":
    main()
