"""What the images cost an operator: build times (cold, warm, after a code edit), image sizes, and compose up to ready.

    python bench/bench_images.py                        # needs a Docker engine; builds with the operator's variables
    UPGRADER_BASE_IMAGE=upgrader-base:bookworm UPGRADER_PIP_SOURCE=wheelhouse python bench/bench_images.py

The cold build is the baseline of the same run: the build cache and the image are removed first, then the
same build runs again unchanged (warm) and after a one-line code edit (what a developer pays). The edit is
made in a copy of the tracked files (git archive), never in the working tree. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def compose_cmd() -> list[str]:
    local = Path(sys.executable).parent / "docker-compose"
    return [str(local)] if local.exists() else ["docker", "compose"]


def timed_build(context: Path, service: str, profile: str) -> float:
    start = time.monotonic()
    run(*compose_cmd(), "-f", str(context / "docker-compose.yml"), "--profile", profile, "build", service, cwd=context)
    return time.monotonic() - start


def image_size(tag: str) -> float:
    return int(run("docker", "image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e9


def copy_of_tree(into: Path) -> Path:
    """The tracked files (as committed plus the working tree's edits), with the wheelhouse linked in."""
    tree = into / "tree"
    tree.mkdir()
    files = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    for wheel in (ROOT / "docker" / "wheelhouse").glob("*.whl"):
        os.link(wheel, tree / "docker" / "wheelhouse" / wheel.name)
    return tree


def up_to_ready(context: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "UPGRADER_PUBLISH_PORT": str(port), "UPGRADER_WORKERS": "1"}
    base = [*compose_cmd(), "-f", str(context / "docker-compose.yml"), "-p", f"upgbench{os.getpid()}", "--profile", "cpu"]
    start = time.monotonic()
    run(*base, "up", "-d", "store-init", "service", cwd=context, env=env)
    try:
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            if time.monotonic() - start > 300:
                logs = subprocess.run([*base, "logs", "--no-color"], cwd=context, env=env, capture_output=True, text=True)
                raise SystemExit(f"the service was not ready within 300 s:\n{logs.stdout[-3000:]}{logs.stderr[-2000:]}")
            time.sleep(0.2)
    finally:
        run(*base, "down", "-v", cwd=context, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-cold", action="store_true", help="keep the build cache (skips the cold builds)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = copy_of_tree(Path(tmp))
        for tag, service, profile in (("upgrader:cpu", "service", "cpu"), ("upgrader:cuda", "trainer", "gpu")):
            cold = None
            if not args.no_cold:
                subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
                run("docker", "builder", "prune", "-af")
                cold = timed_build(tree, service, profile)
            warm = timed_build(tree, service, profile)
            edited = tree / "service" / "app.py"
            edited.write_text(edited.read_text() + f"\n# edit {time.time()}\n")
            after_edit = timed_build(tree, service, profile)
            rows.append((tag, cold, warm, after_edit, image_size(tag)))
        ready = up_to_ready(tree)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\n{cpu}, {os.cpu_count()} cores; base image {os.environ.get('UPGRADER_BASE_IMAGE', 'python:3.11-slim-bookworm')}, "
          f"pip source {os.environ.get('UPGRADER_PIP_SOURCE', 'index')}\n")
    print("| image | cold build s (baseline) | warm, unchanged s | after a code edit s | size GB |")
    print("|---|---|---|---|---|")
    for tag, cold, warm, after_edit, size in rows:
        print(f"| {tag} | {'-' if cold is None else f'{cold:.0f}'} | {warm:.1f} | {after_edit:.1f} | {size:.2f} |")
    print(f"\n`docker compose --profile cpu up -d store-init service` to /readyz 200 (1 worker): {ready:.1f} s")
    print(json.dumps({"rows": rows, "ready_s": ready}))


if __name__ == "__main__":
    main()
