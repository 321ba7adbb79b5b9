"""Where a request's CPU goes: py-spy profiles of this tree's server and a baseline's, under the same load, side by side.

    .venv/bin/python bench/profile_service.py --store STORE --model conv --concurrency 128 --baseline-root CHECKOUT

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


def profile(kind: str, args, pngs: list[bytes], workdir: Path) -> tuple[collections.Counter, float]:
    """Run one server under load, sample it; -> (self samples per function, requests per second)."""
    port = bench_service.free_port()
    spec = bench_service.server_spec(kind, args.model, args.store, port, 1, args.max_wait_ms, "codec", args.baseline_root)
    output = workdir / f"{kind}.txt"
    with bench_service.ServerProcess(spec, port, workdir / f"{kind}.log") as server:
        server.wait_ready(args.ready_timeout)
        load = bench_service.LoadRun(port, spec.upscale_path, pngs, args.concurrency, args.warmup, args.seconds + 1, 30.0)

        async def run() -> None:
            measured = asyncio.create_task(load.run(server.proc.pid))
            await asyncio.sleep(args.warmup + 0.5)
            spy = await asyncio.create_subprocess_exec(
                str(PY_SPY), "record", "--pid", str(server.proc.pid), "--rate", str(SAMPLE_HZ), "--duration", str(args.seconds),
                "--format", "raw", "--nonblocking", "--output", str(output),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await measured
            if await spy.wait() != 0:
                raise SystemExit(f"py-spy failed on the {kind} server (run as root, or set kernel.yama.ptrace_scope=0)")

        asyncio.run(run())
        print(f"{kind}: {len(load.latencies) / (args.seconds + 1):.1f} req/s, {load.error_count} errors", flush=True)
    return self_samples(output), len(load.latencies) / (args.seconds + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="a model store holding --model")
    parser.add_argument("--model", default="conv")
    parser.add_argument("--baseline-root", type=Path, required=True, help="checkout of the baseline tree (git worktree add --detach)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=int, default=10, help="sampled seconds per server")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--top", type=int, default=30, help="rows: the functions whose cost per request differs most")
    parser.add_argument("--data", type=Path, default=bench_service.DEFAULT_DATA)
    args = parser.parse_args()
    _, pngs = bench_service.load_images(args.data, 256)
    with tempfile.TemporaryDirectory(prefix="upgrader-profile-") as tmp:
        per_1000 = {}
        for kind in ("batched", "base"):
            counts, rps = profile(kind, args, pngs, Path(tmp))
            scale = 1000 / (rps * args.seconds)
            per_1000[kind] = {name: n * scale for name, n in counts.items()}
    ours, base = per_1000["batched"], per_1000["base"]
    ms = 1000 / SAMPLE_HZ  # one sample stands for this many ms of CPU
    print(f"\nsamples per 1,000 requests ({ms:g} ms of CPU each): this tree {sum(ours.values()):.1f}, baseline {sum(base.values()):.1f}")
    print(f"{'this tree':>10} {'baseline':>9} {'diff':>7}  function (self samples)")
    names = sorted(set(ours) | set(base), key=lambda name: -abs(ours.get(name, 0) - base.get(name, 0)))
    for name in names[:args.top]:
        a, b = ours.get(name, 0.0), base.get(name, 0.0)
        print(f"{a:10.1f} {b:9.1f} {a - b:+7.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
