"""The CPU forward each model version runs, decided once per machine and recorded beside the model cache.

`fastest_cpu_forward` times every candidate (trace, frozen trace, OpenVINO; two memory formats) at load, and the
choice is noisy: timed by each worker for itself, two workers chose different forwards for 1 to 4 of 5 models in every
round measured (`bench/bench_workers_load.py`), so the same request could be computed by a different forward
(outputs one rounding apart, speed up to 13% apart) depending on the worker its connection reached.

So the choice is recorded in a JSON file (UPGRADER_FORWARD_CHOICES; by default forward-choices.json in
UPGRADER_MODEL_CACHE), keyed by version and by what it depends on: the weights, threads, precision, candidates,
CPU model, torch and OpenVINO versions. The first worker to set a version up on a machine times its candidates and
writes its choice, with the forward's fixed cost (which sets the batcher's regrouping wait, service.runtime.batching),
holding an exclusive lock (flock) on the file over the timing; every other worker, and every later start, reads
them and builds that one forward without timing anything. A changed signature (new weights, another CPU, a torch
upgrade) is timed again and replaces the entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from service.runtime.openvino_forward import openvino  # None where it is not installed

log = logging.getLogger("service.runtime.forward_choices")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def signature(weights_sha256: str, threads: int, bf16: bool, candidates: tuple[str, ...]) -> dict:
    """What a timed choice depends on; a stored choice is reused only where all of it is equal."""
    return {"weights_sha256": weights_sha256, "threads": threads, "bf16": bf16, "candidates": list(candidates),
            "cpu": cpu_name(), "torch": torch.__version__, "openvino": openvino and openvino.__version__}


class ForwardChoices:
    """A JSON file: "name:version" -> {"signature", "forward", "memory_format", "fixed_cost_s"}, in turns."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def turn(self) -> Iterator[ForwardChoices]:
        """Exclusive across processes (and threads: each turn opens the lock file anew) until the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # a damaged file costs a timing, never a load
            log.warning("forward choices unreadable; timing again", extra={"path": str(self.path), "reason": f"{type(exc).__name__}: {exc}"})
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str, wanted: dict) -> dict | None:
        """The measurements recorded for `key` under the signature `wanted` ({"forward", "memory_format",
        "fixed_cost_s", ...}), or None. Call within a turn."""
        entry = self._read().get(key)
        if not isinstance(entry, dict) or entry.get("signature") != wanted:
            return None
        if not (isinstance(entry.get("forward"), str) and entry.get("memory_format") in ("contiguous_format", "channels_last")
                and isinstance(entry.get("fixed_cost_s"), (int, float))):
            log.warning("forward choice incomplete; timing again", extra={"path": str(self.path), "key": key})
            return None
        return entry

    def put(self, key: str, wanted: dict, **measured) -> None:
        """Record a version's measurements (the whole file rewritten and renamed into place: readers never see half).
        Call within a turn."""
        entries = self._read()
        entries[key] = {"signature": wanted, **measured}
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=self.path.name, delete=False) as out:
            json.dump(entries, out, indent=1)
        os.replace(out.name, self.path)
