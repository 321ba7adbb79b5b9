"""The CPU forward each model version runs, chosen once per service and shared by its worker processes.

`fastest_cpu_forward` times every candidate (trace, frozen trace, OpenVINO; two memory formats) at load. Each
worker process used to time for itself, and its choice is noisy: with 2 workers and 5 models, the two chose
different forwards for 1 to 4 of the 5 models in every round measured, even for a worker timing alone
(`bench/bench_workers_load.py` counts it). So the same request could be computed by a different forward (outputs one
rounding apart, speed up to 13% apart) depending on the worker the kernel hashed its connection to.

With a choices file (UPGRADER_FORWARD_CHOICES; the worker supervisor makes one per run when unset), the first
worker to set a version up times its candidates and writes its choice, with the forward's fixed cost (which sets
the batcher's regrouping wait, service.batching), holding an exclusive lock (flock) on the file over the timing;
every other worker, waiting on that lock, then reads them and builds that one forward without timing anything.
The lock also keeps two workers from timing side by side. An entry is reused only under
the same signature (weights, threads, precision, candidates, CPU, torch and OpenVINO versions), so a file kept
across restarts (a path set by hand) is never applied to another machine or build.
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

from service.openvino_forward import openvino  # None where it is not installed

log = logging.getLogger("service.forward_choices")


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
