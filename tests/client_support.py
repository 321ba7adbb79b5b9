"""What tests/test_client.py and tests/test_cli.py share: a real service on a copy of the shipped models, small real
photos (crops of the sr-natural bsd200 photographs), and the `upgrader` command run as a subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from test_service_support import ServiceProcess

from model_store import ModelStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = PROJECT_ROOT / "pretrained"
BSD200 = PROJECT_ROOT.parent / "shared" / "datasets" / "sr-natural" / "bsd200"
API_KEY = "client-test-key"


def seeded_store(root: Path) -> ModelStore:
    """A new store holding a copy of pretrained/ (upgrader and photo, every version)."""
    shutil.copytree(PRETRAINED, root / "store")
    return ModelStore(root / "store")


@contextlib.contextmanager
def service(store: ModelStore, port: int | None = None, **env: str):
    """`python -m service` (one worker process, API key API_KEY) on the store, ready; stopped on exit."""
    run = ServiceProcess(store.url, port=port, env={"UPGRADER_WORKERS": "1", "UPGRADER_API_KEYS": API_KEY, **env})
    try:
        run.wait_ready()
        yield run
    finally:
        run.stop()


def photo_arrays(count: int, sizes: tuple[int, ...] = (32, 40, 48, 56, 64)) -> list[np.ndarray]:
    """`count` different crops (uint8 H x W x 3, sides from `sizes`) of the real bsd200 photographs."""
    files = sorted(BSD200.glob("*.png"))
    assert files, f"no photographs at {BSD200}"
    crops = []
    for k in range(count):
        with Image.open(files[k % len(files)]) as image:
            rgb = np.asarray(image.convert("RGB"))
        h, w = sizes[k % len(sizes)], sizes[(k + 2) % len(sizes)]
        top, left = (17 * k) % (rgb.shape[0] - h), (29 * k) % (rgb.shape[1] - w)
        crops.append(np.ascontiguousarray(rgb[top : top + h, left : left + w]))
    return crops


def encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pixels(data_or_path: bytes | Path) -> np.ndarray:
    data = data_or_path.read_bytes() if isinstance(data_or_path, Path) else data_or_path
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def write_photos(folder: Path, count: int, prefix: str = "photo", **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, array in enumerate(photo_arrays(count, **kwargs)):
        path = folder / f"{prefix}{k:02d}.png"
        path.write_bytes(encode(array))
        paths.append(path)
    return paths


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The command, stdout a pipe (so: JSON lines), with `env` over this process's environment."""
    return subprocess.run(cli_command(*args), env={**os.environ, **(env or {})}, cwd=cwd or PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def json_lines(stdout: str) -> list[dict]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def by_name(records: list[dict]) -> dict[str, dict]:
    """File records by their input's file name."""
    return {Path(r["input"]).name: r for r in records if r.get("event") == "file"}


def code_blocks(markdown: Path, language: str) -> list[str]:
    """The fenced code blocks of one language in a Markdown page, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", markdown.read_text(), flags=re.S | re.M)
