"""A model compiled by OpenVINO for this CPU: one of the float32 forwards `fastest_cpu_forward` times at load.

OpenVINO's CPU plugin fuses each conv with its bias, ReLU and residual add and picks kernels for this
CPU's instruction set. On the Intel Xeon here (AVX-512, one thread, batch 64) it ran the shipped model
(64x8 + global attention) 11-25% faster than TorchScript's frozen trace, with every output within
3e-6 of eager PyTorch (docs/benchmarks.md). Like a trace, `infer` releases the GIL, so the
event loop keeps running while a batch computes.

The model is converted from its TorchScript trace (or the loaded module) by `openvino.convert_model`, in
memory, with a dynamic batch dimension (and dynamic height and width for a model that takes any size, such as
photo_residual): nothing but the store's safetensors is ever read.
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

from upgrader.architectures import INPUT_SHAPE

log = logging.getLogger("service.runtime.openvino_forward")

# OpenVINO's model converter sends usage telemetry (Google Analytics) unless the user opted out in ~/intel, writing
# a client id and counters there and forking a process for every event: 32 forks a model converted here, each a
# copy of a worker holding torch. A self-hosted service does not phone home. Where the openvino_telemetry package
# cannot be imported, the converter runs its own no-op stub (openvino.tools.ovc.telemetry_stub): so it cannot.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type] - None in sys.modules fails the import

try:
    import openvino
except ImportError:  # an optional speed-up: without it the service runs its TorchScript forwards
    openvino = None


class OpenVINOForward(torch.nn.Module):
    """float N x 3 x 8 x 8 -> float N x 3 x 32 x 32 through the compiled model (N x 3 x H x W -> N x 3 x 4H x 4W for a
    model compiled with any_size); any N, from any thread."""

    def __init__(self, model: torch.nn.Module, threads: int, any_size: bool = False) -> None:
        """`model`: a module in eval mode or its trace (torch.jit.ScriptModule), taking NCHW inputs. `any_size`: the
        height and width are dynamic too (one compiled model for every image size)."""
        super().__init__()
        channels = INPUT_SHAPE[0]
        example = torch.zeros((1, channels, 64, 64)) if any_size else torch.zeros((1, *INPUT_SHAPE))
        shape = [-1, channels, -1, -1] if any_size else [-1, *INPUT_SHAPE]
        converted = openvino.convert_model(model, example_input=example, input=[openvino.PartialShape(shape)],
                                           share_weights=False)  # its own copy: the module may be changed or freed
        self.compiled = openvino.Core().compile_model(converted, "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",  # not the plugin's default bf16 on a CPU with AMX: outputs as trained
            "PERFORMANCE_HINT": "LATENCY",  # one batch at a time, as the batcher hands them over
            # Pinning (on by default on Linux) put the inference threads of both worker processes on the same core:
            # two processes running the shipped model at batch 64 made 905-1,040 images/s together with it, and
            # 1,489-1,953 without (docs/serving.md). The workers are sized to the usable CPUs; the
            # kernel's scheduler spreads them.
            "ENABLE_CPU_PINNING": False,
        })
        self._local = threading.local()  # an infer request holds its inputs and outputs: one per calling thread

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        # share_inputs: the tensor's memory is read in place; outputs are copied out (the request reuses its buffers).
        outputs = request.infer({0: x.detach().float().contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(outputs[0])


def openvino_forward(model: torch.nn.Module, threads: int, any_size: bool = False) -> OpenVINOForward | None:
    """`model` compiled by OpenVINO, or None where OpenVINO is not installed or cannot convert it (logged)."""
    if openvino is None:
        return None
    try:
        return OpenVINOForward(model, threads, any_size)
    except Exception as exc:  # noqa: BLE001 - a model OpenVINO cannot convert keeps its TorchScript forwards
        log.warning("model not compiled by OpenVINO; it runs in TorchScript", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return None
