"""Run the service: `python -m service --host 0.0.0.0 --port 8000` (or `upgrader-serve`).

Every flag overrides the UPGRADER_* environment variable of the same name.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from service.observability.logs import configure_logging
from service.settings import Settings
from service.workers import PortTaken, claim_ports, listening_socket, run_workers
from upgrader.cpus import usable_cpus

# This process stays free of torch (and the app): with several workers it is only their supervisor,
# and torch alone is ~500 MB of RSS. Only the worker processes (or the single in-process server) load it.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="upgrader-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="bind address (UPGRADER_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (UPGRADER_PORT, default 8000)")
    parser.add_argument("--store", help="model store: a directory or s3://bucket/prefix (UPGRADER_STORE)")
    parser.add_argument("--default-model", help="model served when a request names none (UPGRADER_DEFAULT_MODEL)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device (UPGRADER_DEVICE, default auto)")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"],
                        help="forward-pass precision (UPGRADER_PRECISION, default auto: bfloat16 on a CPU with native bf16)")
    parser.add_argument("--cpu-forward", choices=["auto", "trace", "frozen", "openvino"],
                        help="what runs a model on the CPU (UPGRADER_CPU_FORWARD, default auto: the fastest, timed at load)")
    parser.add_argument("--max-batch-images", type=int, help="images per forward pass (UPGRADER_MAX_BATCH_IMAGES, default 64)")
    parser.add_argument("--max-wait-ms", type=float, help="batching window (UPGRADER_MAX_WAIT_MS, default 2)")
    parser.add_argument("--workers", type=int, help="server processes (UPGRADER_WORKERS; default 2 on a multi-core CPU, 1 on CUDA)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads per worker (UPGRADER_TORCH_THREADS)")
    parser.add_argument("--log-level", help="log level (UPGRADER_LOG_LEVEL, default INFO)")
    return parser.parse_args(argv)


def cuda_available() -> bool:
    """torch.cuda.is_available(), asked in a short-lived process so this one never imports torch.

    Without the NVIDIA driver's /proc entry there is no CUDA device, and no process is started.
    """
    if not Path("/proc/driver/nvidia/version").exists():
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120, check=False)
    return probe.stdout.strip() == "True"


def default_workers(settings: Settings) -> int:
    """2 on a CPU with 2+ cores, 1 on CUDA or a single core (`bench/bench_service.py --servers batched,batched2`)."""
    cpus = usable_cpus()
    if settings.device == "cpu" or cpus < 2:
        return 1 if cpus < 2 else 2
    return 1 if settings.device == "cuda" or cuda_available() else 2


def main(argv: list[str] | None = None) -> None:
    overrides = {key: value for key, value in vars(parse_args(argv)).items() if value is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    common = dict(host=settings.host, port=settings.port, log_config=None, access_log=False,
                  timeout_graceful_shutdown=settings.request_timeout_s + 5)
    workers = settings.workers or default_workers(settings)
    try:  # this instance's ports, before any model loads: a second instance on them stops here, naming the port
        claimed = claim_ports(settings.host, {"HTTP": settings.port, "gRPC": settings.grpc_port})
    except PortTaken as exc:
        logging.getLogger("service").error("cannot start", extra={"reason": str(exc)})
        sys.exit(f"upgrader-serve: {exc}")
    if workers == 1:
        import uvicorn

        from service.app import create_app
        from service.server import uvicorn_config

        app = create_app(settings)
        app.state.ports_claimed = True  # its gRPC server joins the claimed port (service.grpc.server.start)
        host, port = common.pop("host"), common.pop("port")
        uvicorn.Server(uvicorn_config(app, host, port, **common)).run(sockets=[listening_socket(host, port)])
        del claimed
        return
    # Worker processes build their own app from the environment: hand them the flags that way.
    os.environ.update({f"UPGRADER_{key.upper()}": str(value) for key, value in overrides.items()})
    os.environ["UPGRADER_WORKERS"] = str(workers)  # each worker sizes its torch threads by it
    with tempfile.TemporaryDirectory(prefix="upgrader-workers-") as run_dir:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", run_dir)  # before any worker imports prometheus_client
        host, port = common.pop("host"), common.pop("port")
        code = run_workers(workers, host, port, settings.log_level, common, grace_s=settings.request_timeout_s + 10)
        del claimed
        sys.exit(code)


if __name__ == "__main__":
    main()
