"""Scale-out benchmark: replicas reading one S3 bucket, measured against local disk in the same run.

    .venv/bin/python bench/bench_scaleout.py                    # ~5 minutes on 2 cores
    .venv/bin/python bench/bench_scaleout.py --rounds 3 --duration 15

Starts a real SeaweedFS S3 server on loopback (tests/s3server.py), publishes seeded `conv` and
`resnet18` weights both into a bucket and into a local store directory, then measures:

1. cold start of one replica (`python -m service --workers 1`), from process start to `/readyz`
   200, and the part of it spent loading the version (download + sha256 verify + load + warm-up
   batch, the service's own "loaded version" log line): from a local directory, from S3 with an
   empty cache, and from S3 with the cache a previous start left (re-verified, not downloaded);
2. publish-to-served: two S3 replicas with the default poll interval (UPGRADER_POLL_INTERVAL_S=2);
   a new version is published, and each replica's GET /models/conv is polled every 20 ms until it
   says it serves it;
3. POST /upscale throughput (closed loop, bench_service's load generator, one 8x8 PNG a request)
   through one replica vs two replicas (connections split between them), and one replica with two
   workers (the default on 2+ cores), same machine, same run. On one 2-core machine two replicas
   cannot add cores: the row says what a second replica costs here, not what a second machine adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]  # the tests' real S3 server and service process helpers

from bench_service import LoadRun, load_images  # noqa: E402
from s3server import SeaweedS3  # noqa: E402
from test_service_support import ServiceProcess, publish  # noqa: E402

from model_store import ModelStore  # noqa: E402


def start(store_url: str, env: dict, *flags: str) -> tuple[ServiceProcess, float]:
    started = time.perf_counter()
    replica = ServiceProcess(store_url, *flags, env=env)
    try:
        replica.wait_ready(300)
    except BaseException:  # not ready, or the bench was stopped meanwhile: the process must not outlive it
        replica.stop()
        raise
    return replica, time.perf_counter() - started


def load_seconds(replica: ServiceProcess, model: str) -> float:
    replica.stop()
    entries = [e for e in replica.logs() if e.get("message") == "loaded version" and e.get("model") == model]
    return entries[0]["seconds"] if entries else float("nan")


def cold_starts(stores: dict[str, ModelStore], s3_env: dict, workdir: Path, rounds: int) -> list[dict]:
    rows = []
    for model in ("conv", "resnet18"):
        samples: dict[str, list[tuple[float, float]]] = {"local directory": [], "S3, empty cache": [], "S3, warm cache": []}
        for r in range(rounds):  # interleaved: each round measures every source once
            env = {"UPGRADER_DEFAULT_MODEL": model, "UPGRADER_EXTRA_LOADED_VERSIONS": "0"}
            replica, wall = start(str(stores["local"].root), env, "--workers", "1")
            samples["local directory"].append((wall, load_seconds(replica, model)))
            cache = workdir / f"cache-{model}-{r}"
            s3 = {**s3_env, **env, "UPGRADER_MODEL_CACHE": str(cache)}
            replica, wall = start(stores["s3"].url, s3, "--workers", "1")
            samples["S3, empty cache"].append((wall, load_seconds(replica, model)))
            replica, wall = start(stores["s3"].url, s3, "--workers", "1")
            samples["S3, warm cache"].append((wall, load_seconds(replica, model)))
        for source, values in samples.items():
            rows.append({"model": model, "source": source, "start_to_ready_s": statistics.median(v[0] for v in values),
                         "load_s": statistics.median(v[1] for v in values), "rounds": len(values)})
    return rows


def publish_to_served(store: ModelStore, s3_env: dict, workdir: Path, count: int) -> dict:
    env = {**s3_env, "UPGRADER_DEFAULT_MODEL": "conv"}
    replicas = [start(store.url, {**env, "UPGRADER_MODEL_CACHE": str(workdir / f"pts-{i}")}, "--workers", "1")[0] for i in range(2)]
    latencies: list[float] = []
    try:
        with httpx.Client(timeout=30) as client:
            for k in range(count):
                version, _ = publish(store, "conv", seed=100 + k)
                published = time.perf_counter()
                pending = {r.url for r in replicas}
                while pending:
                    for url in list(pending):
                        if client.get(f"{url}/models/conv").json()["serving_version"] == version:
                            latencies.append(time.perf_counter() - published)
                            pending.discard(url)
                    time.sleep(0.02)
                time.sleep(0.5)
    finally:
        for r in replicas:
            r.stop()
    return {"versions": count, "replicas": 2, "mean_s": statistics.fmean(latencies), "p50_s": statistics.median(latencies),
            "max_s": max(latencies), "poll_interval_s": 2.0}


def throughput(store: ModelStore, s3_env: dict, workdir: Path, pngs: list[bytes], args) -> list[dict]:
    rows = []
    for model in ("conv", "resnet18"):
        env = {**s3_env, "UPGRADER_DEFAULT_MODEL": model}
        # Started once per model; an idle replica costs next to no CPU while another configuration is measured.
        single, second, two_workers = (start(store.url, {**env, "UPGRADER_MODEL_CACHE": str(workdir / f"tp-{i}")}, "--workers", w)[0]
                                       for i, w in enumerate(("1", "1", "2")))
        configs = {"1 replica, 1 worker": [single], "2 replicas, 1 worker each": [single, second], "1 replica, 2 workers": [two_workers]}
        results: dict[str, list[dict]] = {name: [] for name in configs}
        try:
            for _ in range(args.rounds):
                for name, replicas in configs.items():  # interleaved rounds
                    ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
                    run = LoadRun(ports, "/upscale", pngs, args.concurrency, args.warmup, args.duration, 30)
                    usage = asyncio.run(run.run([r.process.pid for r in replicas]))
                    latencies = sorted(run.latencies)
                    results[name].append({"rps": len(latencies) / args.duration, "errors": run.error_count,
                                          "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
                                          "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
                                          "server_cpu": usage["server_cpu"], "other_cpu": usage["other_cpu"]})
        finally:
            for replica in (single, second, two_workers):
                replica.stop()
        for name, runs in results.items():
            rows.append({"model": model, "config": name, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10-jpeg")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per cell (medians reported)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--publishes", type=int, default=5, help="versions published for the publish-to-served rows")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # A SIGTERM (a timeout, a Ctrl-C from a supervisor) unwinds the context managers, so the S3 server
    # and the replicas, each in their own session, are stopped rather than left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _, pngs = load_images(args.data, 256)
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp, SeaweedS3(Path(tmp) / "s3") as server:
        workdir = Path(tmp)
        os.environ.update(server.env())
        stores = {"local": ModelStore(workdir / "store"), "s3": ModelStore(f"s3://bench-{secrets.token_hex(3)}/models")}
        stores["s3"].init()
        for store in stores.values():
            for model in ("conv", "resnet18"):
                publish(store, model, arch=model, seed=1)
        print(f"S3: {server.endpoint} (SeaweedFS), load average at start {os.getloadavg()[0]:.1f}", flush=True)
        report = {"cold_start": cold_starts(stores, server.env(), workdir, args.rounds)}
        print_rows("Cold start of one replica (median)", report["cold_start"], ["model", "source", "start_to_ready_s", "load_s"])
        report["publish_to_served"] = publish_to_served(stores["s3"], server.env(), workdir, args.publishes)
        print_rows("Publish to served, 2 replicas on one bucket", [report["publish_to_served"]],
                   ["versions", "replicas", "poll_interval_s", "mean_s", "p50_s", "max_s"])
        report["throughput"] = throughput(stores["s3"], server.env(), workdir, pngs, args)
        print_rows(f"POST /upscale, c={args.concurrency}, one 8x8 PNG a request (median of {args.rounds})", report["throughput"],
                   ["model", "config", "rps", "p50_ms", "p99_ms", "errors", "server_cpu", "other_cpu"])
        print(f"load average at end {os.getloadavg()[0]:.1f} (2 cores; other_cpu: cores used by everything else meanwhile)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def print_rows(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:,.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
