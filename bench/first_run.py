"""A stranger's first run, timed: `git clone`, then `make run` with no ../shared beside the clone, to the first
`POST /upscale` answer.

    .venv/bin/python bench/first_run.py            # clones this repository's HEAD into a temporary folder

Three phases, each timed on its own in the same run: the clone; `make install` (the venv, torch and the
project, from whatever package index pip is configured with); `make run` to the first 200 from /upscale with
examples/cat-8x8.png (the store seeded from pretrained/, the service started). The clone is a local one: what a
clone from a forge holds, without the network. The temporary folder (about 7 GB, mostly torch) is removed after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(what: str, command: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    with log.open("a") as out:
        result = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{what} failed ({result.returncode}) after {seconds:.0f} s:\n{log.read_text()[-3000:]}")
    print(f"{what}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="HEAD", help="what to clone")
    p.add_argument("--timeout-s", type=float, default=1800)
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    with tempfile.TemporaryDirectory(prefix="first-run-") as tmp:
        tmp = Path(tmp)
        clone, log = tmp / "upgrader", tmp / "log.txt"
        assert not (tmp / "shared").exists()
        times = {"git clone": timed("git clone", ["git", "clone", "--quiet", "--no-local", str(ROOT), str(clone)], tmp, log)}
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", args.ref], capture_output=True, text=True, check=True).stdout.strip()], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UPGRADER_", "VIRTUAL_ENV"))}  # a stranger's shell
        times["make install"] = timed("make install", ["make", "install"], clone, log, env)
        port = free_port()
        started = time.monotonic()
        server = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=clone, stdout=log.open("a"), stderr=subprocess.STDOUT,
                                  env={**env, "UPGRADER_GRPC_PORT": "0"}, start_new_session=True)
        png = (clone / "examples" / "cat-8x8.png").read_bytes()
        try:
            while True:
                if server.poll() is not None or time.monotonic() - started > args.timeout_s:
                    raise SystemExit(f"make run gave no answer:\n{log.read_text()[-3000:]}")
                try:
                    answer = httpx.post(f"http://127.0.0.1:{port}/upscale", content=png, timeout=30,
                                        headers={"content-type": "image/png", "accept": "image/png"})
                    if answer.status_code == 200 and answer.content.startswith(b"\x89PNG"):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            times["make run to the first /upscale answer"] = time.monotonic() - started
            print(f"make run to the first /upscale answer: {times['make run to the first /upscale answer']:.1f} s", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
        shutil.rmtree(clone / ".venv", ignore_errors=True)
    print(f"\n{cpu}, {os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n")
    print("| phase | seconds |\n|---|---|")
    for what, seconds in times.items():
        print(f"| {what} | {seconds:.0f} |")
    print(f"| **git clone to the first answer** | **{sum(times.values()):.0f}** |")


if __name__ == "__main__":
    sys.exit(main())
