"""Upgrader vs NVIDIA Triton Inference Server, both driven by Triton's own perf_analyzer over the V2 protocol.

    PA=$(tests/tools/perf_analyzer.sh)   # perf_analyzer 2.41.0 and the libcudart it links
    .venv/bin/python bench/bench_triton.py --store STORE --triton-python /tmp/tv/bin/python \
        --perf-analyzer $PA/bin/perf_analyzer --perf-lib-path $PA/nvidia/cuda_runtime/lib
    .venv/bin/python bench/bench_triton.py --store STORE ... --models conv --concurrency 32 --rounds 3
    .venv/bin/python bench/bench_triton.py --store STORE ... --baseline-ref HEAD~3   # also this tree vs an earlier one
    .venv/bin/python bench/bench_triton.py --store STORE ... --protocol grpc         # the same, over gRPC on both servers

Setup (bench-only, nothing of it is a project dependency; see docs/benchmarks.md):

* Triton: the `tritonserver` binary that PyPI `nvidia-pytriton` ships, run directly on a model
  repository this script writes (PyTriton's own bind() path is not used). The wheel ships only the
  Python backend, so each model is bench/triton/model.py: it loads the same store version with
  model_store (same weights, same architecture code) and runs one forward pass per batch that
  Triton's dynamic batcher forms. The backend's stub is the wheel's Python 3.11 stub, pointed at this
  interpreter's libpython (LD_LIBRARY_PATH) and the project venv's packages (PYTHONPATH).
* perf_analyzer: PyPI's `perf-analyzer` package is a placeholder here; the real binary comes from
  the `tritonclient==2.41.0` wheel (`tritonclient-2.41.0.data/data/bin/perf_analyzer`), which needs
  the Debian package libb64-0d and libcudart.so.12 (PyPI `nvidia-cuda-runtime-cu12`) on LD_LIBRARY_PATH.

Fairness: both servers get 2 model instances / worker processes with 1 torch thread each, the same
maximum batch (64) and the same queue delay (--max-queue-delay-us, default 2000 = Upgrader's
UPGRADER_MAX_WAIT_MS 2 ms; Triton waits it out on every partial batch, Upgrader only while work is
waiting); same 8x8 inputs (real CIFAR-10 test images, as UINT8 [1, 3, 8, 8] binary tensors), same
output (UINT8 [1, 3, 32, 32], binary); both run the model in float32 (--upgrader-precision). Both servers stay up; the one not measured is SIGSTOPped and the
cells alternate between them. CPU seconds per 1,000 inferences: the server's whole process tree
(Triton: tritonserver and its stubs; Upgrader: supervisor and workers) over the cell, divided by the
inferences the server itself counted over the same span.

`--baseline-ref REF` adds a third server, Upgrader as of git REF (checked out with `git worktree add
--detach` into the temporary directory, same settings), measured in the same rotation, and a second
table: this tree against it, cell by cell.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ServerProcess, ServerSpec, load_images, process_tree_cpu_s

from model_store import ModelStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("UPGRADER_DATA", PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
SERVERS = ("upgrader", "triton")


@dataclass
class Cell:
    model: str
    server: str
    concurrency: int
    round: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s_per_1000: float | None = None
    inferences: int = 0
    error: str | None = None
    loadavg_1m: float = 0.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def triton_home(python: str) -> Path:
    out = subprocess.run([python, "-c", "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def site_packages(python: str) -> str:
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()


def write_repository(root: Path, store: ModelStore, models: list[str], args) -> Path:
    repo = root / "repository"
    for name in models:
        version = store.resolve(name, "latest")
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / "bench" / "triton" / "model.py", repo / name / "1" / "model.py")
        (repo / name / "1" / "sys_path.txt").write_text(f"{PROJECT_ROOT}\n{site_packages(sys.executable)}\n")
        parameters = {"store": str(store.root), "model": name, "version": str(version), "torch_threads": str(args.threads),
                      "forward": args.triton_forward}
        (repo / name / "config.pbtxt").write_text(f"""name: "{name}"
backend: "python"
max_batch_size: 64
input [{{ name: "input", data_type: TYPE_UINT8, dims: [3, 8, 8] }}]
output [{{ name: "output", data_type: TYPE_UINT8, dims: [3, 32, 32] }}]
dynamic_batching {{ max_queue_delay_microseconds: {args.max_queue_delay_us} }}
instance_group [{{ kind: KIND_CPU, count: {args.instances} }}]
""" + "".join(f'parameters {{ key: "{k}", value: {{ string_value: "{v}" }} }}\n' for k, v in parameters.items()))
    return repo


class Server(ServerProcess):
    """bench_service's server process (own session, log file, SIGSTOP/SIGCONT, graceful stop), ready when its models are."""

    def __init__(self, kind: str, command: list[str], env: dict[str, str], port: int, log: Path, grpc_port: int):
        super().__init__(ServerSpec(kind, command, env, ready_path="/v2/health/ready", upscale_path=""), port, log)
        self.grpc_port = grpc_port  # the same V2 protocol over gRPC (perf_analyzer -i grpc)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def wait_for_models(self, models: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        said = time.monotonic()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if all(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/models/{m}/ready", timeout=2).status == 200 for m in models):
                    return
            time.sleep(0.5)
            if time.monotonic() - said > 30:
                said = time.monotonic()
                print(f"  waiting for {self.kind}: {self.log_path.read_text(errors='replace').strip().splitlines()[-1:]}", flush=True)
        raise RuntimeError(f"{self.kind} not ready after {timeout:.0f}s:\n{self.log_path.read_text()[-3000:]}")

    def inferences(self, model: str) -> int:
        """What the server itself counted as inferred (images)."""
        if self.kind == "triton":
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/models/{model}/stats", timeout=10) as response:
                return sum(s["inference_count"] for s in json.load(response)["model_stats"])
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(f'upgrader_images_served_total{{model="{model}"}}'):
                    return int(float(line.split()[-1]))
        return 0


def start_triton(root: Path, repo: Path, args) -> Server:
    home = triton_home(args.triton_python)
    backends = root / "backends"
    shutil.copytree(home / "backends", backends)
    # The python backend runs the stub found next to it; the wheel keeps one per Python version.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(home / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    port, grpc_port = free_port(), free_port()
    command = [str(home / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
               "--http-address=127.0.0.1", f"--http-port={port}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}", f"--metrics-port={free_port()}", "--allow-metrics=false",
               "--log-verbose=0", "--exit-on-error=true",
               # importing torch in each stub can take a minute on a loaded machine; the default 30 s kills it
               "--backend-config=python,stub-timeout-seconds=600",
               # one model at a time: six stubs importing torch at once on 2 loaded cores once left resnet18 hung at load
               "--model-load-thread-count=1", f"--cache-directory={home / 'caches'}"]
    env = {
        # the stub links libpython3.11.so.1.0: take this interpreter's (its stdlib must match), and its packages
        # and the wheel's own CUDA runtime, which the copied stub no longer finds by its relative RPATH
        "LD_LIBRARY_PATH": ":".join(filter(None, [sysconfig.get_config_var("LIBDIR"), str(home.parent.parent / "nvidia_pytriton.libs"),
                                                  os.environ.get("LD_LIBRARY_PATH")])),
        "PYTHONPATH": ":".join([str(PROJECT_ROOT), site_packages(sys.executable)]),
        "PYTHONHOME": sys.base_prefix,
    }
    return Server("triton", command, env, port, root / "triton.log", grpc_port)


def start_upgrader(root: Path, store: ModelStore, args, tree: Path = PROJECT_ROOT, kind: str = "upgrader") -> Server:
    port, grpc_port = free_port(), free_port()
    env = {"UPGRADER_GRPC_PORT": str(grpc_port), "UPGRADER_STORE": str(store.root), "UPGRADER_WORKERS": str(args.instances), "UPGRADER_TORCH_THREADS": str(args.threads),
           "UPGRADER_MAX_BATCH_IMAGES": "64", "UPGRADER_MAX_WAIT_MS": str(args.max_queue_delay_us / 1000), "PYTHONPATH": str(tree),
           "UPGRADER_PRECISION": args.upgrader_precision}
    return Server(kind, [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], env, port,
                  root / f"{kind}.log", grpc_port)


@contextlib.contextmanager
def baseline_tree(root: Path, ref: str):
    """`ref` checked out (detached) under `root`, removed afterwards; yields (path, short commit)."""
    path = root / "baseline"
    subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", str(path), ref], check=True, capture_output=True)
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        yield path, commit
    finally:
        subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "remove", "--force", str(path)], check=False, capture_output=True)


def write_input_data(root: Path, images: np.ndarray) -> Path:
    """perf_analyzer's --input-data: one entry per real image, cycled through."""
    path = root / "inputs.json"
    path.write_text(json.dumps({"data": [{"input": {"content": image.reshape(-1).tolist(), "shape": [3, 8, 8]}} for image in images]}))
    return path


def run_perf_analyzer(server: Server, model: str, concurrency: int, inputs: Path, root: Path, args) -> Cell:
    report = root / f"pa-{server.kind}-{model}-{concurrency}.csv"
    port = server.grpc_port if args.protocol == "grpc" else server.port
    command = [args.perf_analyzer, "-m", model, "-u", f"127.0.0.1:{port}", "-i", args.protocol, "-b", "1",
               f"--concurrency-range={concurrency}", f"--measurement-interval={int(args.interval_s * 1000)}", "--percentile=99",
               # the machine is shared: windows are reported, not retried until stable
               "--stability-percentage=1000", "--max-trials=3", f"--input-data={inputs}", "-f", str(report)]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [args.perf_lib_path, os.environ.get("LD_LIBRARY_PATH")]))}
    cell = Cell(model, server.kind, concurrency, 0, loadavg_1m=os.getloadavg()[0])
    count_before, cpu_before = server.inferences(model), process_tree_cpu_s(server.proc.pid)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.cell_timeout_s, check=False)
    cpu = process_tree_cpu_s(server.proc.pid) - cpu_before
    count = server.inferences(model) - count_before
    if done.returncode != 0 or not report.exists():
        cell.error = (done.stdout + done.stderr).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        cell.error = cell.error[0][:200]
        return cell
    row = next(csv.DictReader(report.open()))
    cell.rps = float(row["Inferences/Second"])
    cell.p50_ms = float(row["p50 latency"]) / 1000
    cell.p99_ms = float(row["p99 latency"]) / 1000
    cell.inferences = count
    cell.cpu_s_per_1000 = cpu / count * 1000 if count else None
    return cell


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def median_cells(cells: list[Cell]) -> dict[tuple, Cell]:
    import statistics

    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.concurrency, cell.server), []).append(cell)
    out = {}
    for key, rows in groups.items():
        ok = [r for r in rows if r.error is None]
        merged = Cell(key[0], key[2], key[1], -1, error=None if ok else rows[0].error)
        for measure in ("rps", "p50_ms", "p99_ms", "cpu_s_per_1000", "loadavg_1m"):
            values = [getattr(r, measure) for r in ok if getattr(r, measure) is not None]
            setattr(merged, measure, statistics.median(values) if values else None)
        out[key] = merged
    return out


def print_table(cells: list[Cell], models: list[str], concurrencies: list[int]) -> list[dict]:
    summary = median_cells(cells)
    print(f"\n{'model':<18} {'c':>4} | {'Upgrader req/s':>14} {'p50':>7} {'p99':>7} {'cpu-s/1k':>8} | {'Triton req/s':>12} {'p50':>7} "
          f"{'p99':>7} {'cpu-s/1k':>8} | {'ratio':>5}  target (c>=32: req/s >= Triton, p99 <= Triton)")
    verdicts = []
    for model in models:
        for c in concurrencies:
            ours, theirs = summary.get((model, c, "upgrader")), summary.get((model, c, "triton"))
            if ours is None or theirs is None:
                continue
            ratio = ours.rps / theirs.rps if ours.rps and theirs.rps else None
            verdict = ""
            if c >= 32 and ratio is not None:
                met = ratio >= 1 and ours.p99_ms <= theirs.p99_ms
                verdict = "MET" if met else (f"MISSED: req/s {100 * (ratio - 1):+.0f}%, p99 {100 * (ours.p99_ms / theirs.p99_ms - 1):+.0f}%")
                verdicts.append({"model": model, "concurrency": c, "ratio": ratio, "p99_ratio": ours.p99_ms / theirs.p99_ms, "met": met})
            print(f"{model:<18} {c:>4} | {fmt(ours.rps):>14} {fmt(ours.p50_ms, 2):>7} {fmt(ours.p99_ms, 2):>7} {fmt(ours.cpu_s_per_1000, 2):>8} | "
                  f"{fmt(theirs.rps):>12} {fmt(theirs.p50_ms, 2):>7} {fmt(theirs.p99_ms, 2):>7} {fmt(theirs.cpu_s_per_1000, 2):>8} | "
                  f"{fmt(ratio, 2):>5}  {verdict}" + (f"  errors: {ours.error or ''} {theirs.error or ''}" if ours.error or theirs.error else ""))
    return verdicts


def print_baseline_table(cells: list[Cell], models: list[str], concurrencies: list[int], baseline: str) -> None:
    summary = median_cells(cells)
    print(f"\n{'model':<18} {'c':>4} | {'this tree req/s':>15} {'p99':>7} {'cpu-s/1k':>8} | {baseline + ' req/s':>22} {'p99':>7} "
          f"{'cpu-s/1k':>8} | {'ratio':>5}")
    for model in models:
        for c in concurrencies:
            ours, theirs = summary.get((model, c, "upgrader")), summary.get((model, c, baseline))
            if ours is None or theirs is None:
                continue
            ratio = ours.rps / theirs.rps if ours.rps and theirs.rps else None
            print(f"{model:<18} {c:>4} | {fmt(ours.rps):>15} {fmt(ours.p99_ms, 2):>7} {fmt(ours.cpu_s_per_1000, 2):>8} | "
                  f"{fmt(theirs.rps):>22} {fmt(theirs.p99_ms, 2):>7} {fmt(theirs.cpu_s_per_1000, 2):>8} | {fmt(ratio, 2):>5}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="model store with the models to serve (latest versions)")
    parser.add_argument("--models", default="conv,resnet18,subpixel_residual")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--rounds", type=int, default=1, help="repeat every cell (servers alternated) and report medians")
    parser.add_argument("--interval-s", type=float, default=3.0, help="perf_analyzer measurement window")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http",
                        help="the V2 protocol over REST or over gRPC (both servers, same models and settings)")
    parser.add_argument("--cell-timeout-s", type=float, default=180.0)
    parser.add_argument("--instances", type=int, default=2, help="Triton model instances = Upgrader worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per instance / worker")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton max_queue_delay_microseconds = Upgrader max_wait_ms * 1000")
    parser.add_argument("--images", type=int, default=64, help="distinct real test images perf_analyzer cycles through")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--triton-python", default=sys.executable, help="a Python with nvidia-pytriton installed (for its tritonserver)")
    parser.add_argument("--perf-analyzer", default=shutil.which("perf_analyzer") or "perf_analyzer")
    parser.add_argument("--perf-lib-path", default="", help="LD_LIBRARY_PATH additions for perf_analyzer (libcudart.so.12)")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--upgrader-precision", choices=["float32", "bfloat16", "auto"], default="float32",
                        help="Upgrader's UPGRADER_PRECISION: float32, as Triton's Python backend runs the model (bfloat16/auto: "
                             "Upgrader's bf16 forward where this CPU has it; trees before it ignore the variable)")
    parser.add_argument("--triton-forward", choices=["eager", "openvino"], default="eager",
                        help="how Triton's Python backend runs the model: eager PyTorch (the backend's own way), or "
                             "compiled by OpenVINO with the service's own settings (service/runtime/openvino_forward.py), the forward "
                             "Upgrader chooses for most models on this CPU: what Triton's OpenVINO backend would run")
    parser.add_argument("--baseline-ref", default=None, help="also serve Upgrader as of this git ref, measured in the same rotation")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.servers = [s for s in args.servers.split(",") if s]
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers' process groups are stopped on the way out
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cpus; {args.instances} instances x {args.threads} torch thread(s); "
          f"queue delay {args.max_queue_delay_us} us; perf_analyzer -i {args.protocol}, window {args.interval_s:g}s; Triton's forward: {args.triton_forward}", flush=True)
    store = ModelStore(args.store)
    targets, _ = load_images(args.data, args.images)
    from upgrader.imaging import downsample, to_float

    images = (downsample(to_float(targets)) * 255).round().clamp(0, 255).byte().numpy()
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        inputs = write_input_data(root, images)
        servers = []
        if "triton" in args.servers:
            servers.append(stack.enter_context(start_triton(root, write_repository(root, store, args.models, args), args)))
        if "upgrader" in args.servers:
            servers.append(stack.enter_context(start_upgrader(root, store, args)))
        baseline = None
        if args.baseline_ref:
            tree, commit = stack.enter_context(baseline_tree(root, args.baseline_ref))
            baseline = f"upgrader@{commit}"
            servers.append(stack.enter_context(start_upgrader(root, store, args, tree, baseline)))
        for server in servers:
            started = time.monotonic()
            server.wait_for_models(args.models, args.ready_timeout)
            print(f"{server.kind}: ready after {time.monotonic() - started:.1f}s on :{server.port}", flush=True)
            server.pause()
        for round_index in range(args.rounds):
            for model in args.models:
                for concurrency in args.concurrency:
                    shift = (round_index + concurrency) % len(servers)  # who goes first rotates
                    order = servers[shift:] + servers[:shift]
                    for server in order:
                        server.resume()
                        try:
                            cell = run_perf_analyzer(server, model, concurrency, inputs, root, args)
                        finally:
                            server.pause()
                        cell.round = round_index
                        cells.append(cell)
                        print(f"  {model:<18} {server.kind:<9} c={concurrency:<4} {fmt(cell.rps):>9} inf/s  p50 {fmt(cell.p50_ms, 2)} ms  "
                              f"p99 {fmt(cell.p99_ms, 2)} ms  cpu-s/1k {fmt(cell.cpu_s_per_1000, 2)}  load {cell.loadavg_1m:.1f}"
                              + (f"  ERROR {cell.error}" if cell.error else ""), flush=True)
        for server in servers:
            server.resume()
    verdicts = print_table(cells, args.models, args.concurrency)
    if baseline:
        print_baseline_table(cells, args.models, args.concurrency, baseline)
    print(f"\nmedians of {args.rounds} round(s); load average now {os.getloadavg()} (2 shared cores: other tenants' load is in it)")
    if args.json:
        args.json.write_text(json.dumps({"cells": [asdict(c) for c in cells], "verdicts": verdicts}, indent=2))


if __name__ == "__main__":
    main()
