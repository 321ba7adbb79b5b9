"""How many CPUs this process may use: what thread and worker counts are sized by.

os.cpu_count() is the host's count. In a container pinned to a few CPUs (docker `cpuset`, the kubelet's
static CPU manager, `taskset`), or capped by a CPU quota (a pod's `limits.cpu`, docker `--cpus`), sizing
threads by it oversubscribes the CPUs the process really has: with 16 host CPUs and 2 allowed, each
of 2 service workers would start 7 torch threads. So the count here is the affinity mask, capped by
the cgroup quota (rounded up), as Go's automaxprocs and the JVM do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>"
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")  # cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us


def cpu_quota(v2: Path = CGROUP_V2_CPU_MAX, v1: Path = CGROUP_V1_CPU) -> float | None:
    """CPUs' worth of time the cgroup allows per period (e.g. 1.5), or None when it sets no quota (or cannot be read)."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), capped by its cgroup's CPU quota; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform (macOS)
        count = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (the AVX512-BF16 instructions, or AMX tiles).

    There, bf16 autocast runs a conv body ~1.9x faster than float32 (subpixel_residual 64x8, batch 64, one
    thread, AMD EPYC Zen 4: 2,328 vs 1,224 images/s). oneDNN's own "bf16 supported" answer
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is also true on plain AVX-512, where it converts to
    float32 and back around every multiply: on an Intel Xeon with AVX-512 but no AVX512-BF16 that model
    served at 0.46x of float32's speed in bf16 and trained 1.6x slower a step (`bench/bench_precision.py`).
    So ask for the instructions themselves.
    """
    import torch  # here: the launcher and settings read the CPU count above without loading torch

    cpu = torch.cpu
    if hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    flags = _cpuinfo_flags()  # a torch without those probes
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
