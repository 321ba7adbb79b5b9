"""bf16 on the CPU: the service's forward pass (UPGRADER_PRECISION). The trainer's --amp auto: tests/test_trainer.py."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_service_support import BUSY_SUBPIXEL_PARAMS, LiveServer, busy_subpixel_model, outputs_of, png_list, publish, small_inputs

from model_store import ModelStore
from service.runtime.upscaler import pick_precision
from upgrader.cpus import _cpuinfo_flags, native_bf16_cpu


def test_auto_precision_is_bf16_only_on_a_cpu_that_has_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU: the rule is read, nothing runs
    assert pick_precision("auto", cpu) == ("bfloat16" if native_bf16_cpu() else "float32")
    assert pick_precision("auto", cuda) == "float32"
    assert pick_precision("float32", cpu) == "float32"
    assert pick_precision("bfloat16", cpu) == "bfloat16"  # honoured where emulated too (with a warning)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_native_bf16_means_the_bf16_instructions_not_onednns_emulation():
    """True only where the CPU lists AVX512-BF16 or AMX-BF16: oneDNN's own check also says yes on plain AVX-512
    (it emulates bf16 there, at half float32's speed), and auto must not pick bf16 on such a CPU."""
    flags = _cpuinfo_flags()
    assert flags, "no flags line in /proc/cpuinfo"
    assert native_bf16_cpu() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx512f avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx512f avx512_vnni\n")
    assert _cpuinfo_flags(cpuinfo) == {"fpu", "avx512f", "avx512_vnni"}
    assert _cpuinfo_flags(tmp_path / "absent") == set()


def test_a_bf16_service_runs_in_bf16_and_answers_within_a_few_levels_of_float32(tmp_path, real_images, monkeypatch):
    params = BUSY_SUBPIXEL_PARAMS
    model = busy_subpixel_model()
    store = ModelStore(tmp_path / "store")
    publish(store, "sr", arch="subpixel_residual", model=model, params=params)
    monkeypatch.delenv("UPGRADER_PRECISION")
    images = [base64.b64encode(png).decode() for png in png_list(small_inputs(real_images))]
    served = {}
    for precision in ("float32", "bfloat16"):
        with LiveServer(store=store.root, poll_interval_s=60, precision=precision) as live, \
                httpx.Client(base_url=live.url, timeout=60) as client:
            listing = client.get("/models").json()
            assert (listing["precision"], listing["device"]) == (precision, "cpu")
            response = client.post("/upscale", json={"images": images})
            assert response.json()["metrics"]["precision"] == precision
            served[precision] = outputs_of(response).int()
    difference = (served["bfloat16"] - served["float32"]).abs()
    # Two float32 services differ only where another memory format or batch flips a rounding at x.5 (measured: 2
    # pixels in 196,608); bf16's coarser products move ~12% of them by a level. So >1% shows bf16 did run.
    assert (difference > 0).double().mean() > 0.01
    assert difference.max() <= 3, difference.max()
    mse = (difference.double() ** 2).mean().item()
    assert 10 * np.log10(255**2 / mse) > 40, f"bf16 outputs {10 * np.log10(255**2 / mse):.1f} dB from float32's"

