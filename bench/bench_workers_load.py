"""How a service's worker processes set their models up: do they run the same CPU forward, how long until they are
ready, and what the shipped model then serves. This tree against another checkout, in alternating rounds.

    git worktree add --detach /tmp/base <rev>
    .venv/bin/python bench/bench_workers_load.py --baseline-root /tmp/base --rounds 3

Each round starts `python -m service --workers 2` (the default on 2+ cores) from each tree in turn on one store
holding five models: `upgrader` (copied from pretrained/) and fc, conv, resnet18 and subpixel_residual 48x6 with
seeded weights. From the workers' JSON logs ("loaded version", one per worker and model) it reads which forward
and memory format each worker chose, and how it chose (`forward_source`: timed, or shared from the other worker
through service/runtime/forward_choices.py). `ready s` is the time from the start until both workers logged all five.
Then `upgrader` gets a closed loop of single-image /upscale requests (bench_service.LoadRun, `--concurrency`
connections for `--seconds`), spread over both workers by the kernel (SO_REUSEPORT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import DEFAULT_DATA, PROJECT_ROOT, LoadRun, ServerProcess, ServerSpec, free_port, load_images, publish_fresh  # noqa: E402

from model_store import ModelStore  # noqa: E402

SEEDED = ("fc", "conv", "resnet18", "subpixel_residual")
MODELS = ("upgrader", *SEEDED)


def make_store(root: Path) -> tuple[ModelStore, list[bytes]]:
    store = ModelStore(root)
    targets, pngs = load_images(DEFAULT_DATA, 64)
    for seed, name in enumerate(SEEDED):
        publish_fresh(store, name, seed, targets, pngs)
    store.copy_from(ModelStore(PROJECT_ROOT / "pretrained"), "upgrader")
    return store, pngs


def loaded_entries(log_path: Path) -> list[dict]:
    entries = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == "loaded version":
                entries.append(entry)
    return entries


def one_run(tree: str, root: Path, store: Path, pngs: list[bytes], workdir: Path, round_: int, args) -> dict:
    port = free_port()
    env = {"UPGRADER_STORE": str(store), "UPGRADER_WORKERS": "2", "UPGRADER_GRPC_PORT": "0", "PYTHONPATH": str(root), "UPGRADER_LOG_LEVEL": "INFO"}
    spec = ServerSpec(tree, [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], env, "/readyz",
                      "/upscale?model=upgrader", root)
    log_path = workdir / f"{tree}-{round_}.log"
    started = time.perf_counter()
    with ServerProcess(spec, port, log_path) as server:
        while True:
            entries = loaded_entries(log_path)
            if len({(e["pid"], e["model"]) for e in entries}) == 2 * len(MODELS):
                break
            if server.proc.poll() is not None or time.perf_counter() - started > args.timeout:
                raise RuntimeError(f"{tree}: not every worker loaded every model:\n{server.log_tail()}")
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        server.wait_ready(60)
        load = LoadRun(port, spec.upscale_path, pngs, args.concurrency, args.warmup, args.seconds, 30)
        asyncio.run(load.run(server.proc.pid))
    by_model: dict[str, list[dict]] = {}
    for entry in entries:
        by_model.setdefault(entry["model"], []).append(entry)
    choice = {name: sorted((e["forward"], e["memory_format"], e.get("forward_source", "timed")) for e in found)
              for name, found in by_model.items()}
    return {"tree": tree, "round": round_, "ready_s": ready_s,
            "alike": sum(len({c[:2] for c in chosen}) == 1 for chosen in choice.values()),
            "upgrader": " / ".join(f"{forward} ({source})" for forward, _, source in choice["upgrader"]),
            "rps": len(load.latencies) / args.seconds, "errors": load.error_count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-root", type=Path, required=True, help="checkout the baseline service runs from")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for both workers to load every model")
    args = p.parse_args()
    trees = {"this tree": PROJECT_ROOT, "baseline": args.baseline_root.resolve()}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        workdir = Path(tmp)
        _, pngs = make_store(workdir / "store")
        rows = []
        for round_ in range(1, args.rounds + 1):
            order = list(trees.items()) if round_ % 2 else list(trees.items())[::-1]  # alternate who goes first
            for tree, root in order:
                rows.append(one_run(tree, root, workdir / "store", pngs, workdir, round_, args))
                print(f"round {round_} {tree}: ready {rows[-1]['ready_s']:.1f} s, {rows[-1]['alike']} of {len(MODELS)} alike, "
                      f"upgrader {rows[-1]['upgrader']}, {rows[-1]['rps']:.0f} req/s", file=sys.stderr, flush=True)
    print(f"\nbench_workers_load: 2 workers, {len(MODELS)} models, {args.rounds} rounds; /upscale?model=upgrader at "
          f"c={args.concurrency} for {args.seconds:.0f} s; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| tree | round | ready s | models both workers run alike | upgrader: each worker's forward | upgrader req/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tree']} | {row['round']} | {row['ready_s']:.1f} | {row['alike']} of {len(MODELS)} | {row['upgrader']} | "
              f"{row['rps']:.0f} | {row['errors']} |")
    for tree in trees:
        mine = [row for row in rows if row["tree"] == tree]
        print(f"| **{tree}, median** | | {statistics.median(r['ready_s'] for r in mine):.1f} | "
              f"{statistics.fmean(r['alike'] for r in mine):.1f} (mean) | | {statistics.median(r['rps'] for r in mine):.0f} | "
              f"{sum(r['errors'] for r in mine)} |")


if __name__ == "__main__":
    main()
