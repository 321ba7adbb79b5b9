"""The model contract (after LitServe's LitAPI): setup, decode, predict, encode.

An `Upscaler` is one loaded (model, version) on one device. It knows nothing about
queues or HTTP: `service.runtime.batching` calls `run_batch` on its worker thread with images
merged from many requests.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from model_store import ModelStore
from service.runtime import codec
from service.runtime.forward_choices import ForwardChoices, signature
from service.runtime.openvino_forward import openvino_forward
from upgrader.architectures import INPUT_SHAPE, INPUT_SIZE, OUTPUT_SHAPE
from upgrader.cpus import native_bf16_cpu
from upgrader.ensemble import VIEWS, dihedral, self_ensemble, undo_dihedral
from upgrader.imaging import to_float

log = logging.getLogger("service.runtime.upscaler")


def gil_free(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """`model` as a TorchScript trace: its whole forward pass is one call that runs without the GIL.

    In eager mode every module call and op comes back to Python and needs the GIL, which the event
    loop holds most of the time under load: at batch 64 with one other busy Python thread, eager
    conv ran at 450 images/s and its trace at 2,660 (4,160 and 3,800 alone; subpixel_residual 132
    vs 741, resnet18 79 vs 462). The trace runs the same ops, so outputs are bitwise equal.
    torch.jit is deprecated in favour of torch.export/AOTInductor, which need a C++ compiler where the
    service runs; if tracing fails the model stays eager (logged).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": see above
            return torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:  # noqa: BLE001 - any failure to trace leaves a working eager model
        log.warning("model not traced; it runs eagerly", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return model


def frozen(traced: torch.jit.ScriptModule) -> torch.nn.Module | None:
    """A trace frozen for inference (torch.jit.freeze, then optimize_for_inference), or None where that fails.

    Freezing turns the weights into constants, so TorchScript can fold them: convolutions become oneDNN
    convolutions with prepacked weights, fused with the add and ReLU after them. Measured as served, one
    thread, batch 64, on an Intel Xeon (AVX-512, no bf16): subpixel_residual 48x6 1,464 images/s frozen
    against 1,265 as a plain trace; 64x8 + attention a tie (`bench/bench_precision.py`). Outputs differ
    only by float rounding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation of torch.jit, as in gil_free
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except Exception as exc:  # noqa: BLE001 - a model TorchScript cannot freeze keeps its plain trace
        log.warning("trace not frozen; it runs as traced", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return None


# The registry loads versions concurrently, but what setup times (the CPU forward it chooses, the fixed cost the batcher
# waits on) it times one model at a time, or the timings disturb each other: with 5 models loading at once on 2 cores
# the shipped model and resnet18 kept frozen traces 12-26% slower than OpenVINO, which each chose alone.
TIMING_LOCK = threading.Lock()
CPU_FORWARDS = ("trace", "frozen", "openvino")  # what fastest_cpu_forward may choose from (openvino: float32, NCHW)
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last}


ANY_SIZE_TIMING_SHAPE = (INPUT_SHAPE[0], 96, 96)  # what an any-size model is traced and timed on: a small tile, seconds to time
ANY_SIZE_BATCHES = (1, 2)


def fastest_cpu_forward(model: torch.nn.Module, batch_sizes: tuple[int, ...] = (8, 32),
                      formats: tuple[torch.memory_format, ...] = tuple(MEMORY_FORMATS.values()),
                      bf16: bool = False, forwards: tuple[str, ...] = CPU_FORWARDS,
                      any_size: bool = False) -> tuple[torch.nn.Module, torch.memory_format, str]:
    """`model` traced (gil_free), as it is or frozen, in whichever memory format runs it fastest here, or compiled by
    OpenVINO where that is faster still: (module, format, forward).

    oneDNN's convolutions work in NHWC: with NCHW tensors every conv reorders its input and output.
    Measured in process, one thread, traced: conv ran 35-40% faster in channels_last at every batch
    size (0.104 -> 0.065 ms an image at 32), subpixel_residual the same, resnet18 slower at small
    batches (1.45 -> 2.10 ms an image at 8). A frozen trace (`frozen`) ran subpixel_residual 48x6
    16% faster on an Intel Xeon, and 64x8 + attention no faster. So each model is timed every way at load, at batch sizes a busy worker
    sees, and keeps the fastest. Outputs differ from NCHW's trace only by float rounding (sums in
    another order).

    `bf16`: traced under bf16 autocast, which writes its casts into the trace (weights and inputs to
    bf16 before each conv and linear, outputs back where an op needs float32), so the trace runs in
    bf16 wherever it is called. OpenVINO (`service.runtime.openvino_forward`) is a float32 candidate only.

    `any_size`: a fully convolutional model that takes any H x W (photo_residual). It is traced and timed on
    ANY_SIZE_TIMING_SHAPE at batches ANY_SIZE_BATCHES (`batch_sizes` ignored); a trace of convolutions, pixel shuffle
    and a scale-factor interpolation runs at every size, and OpenVINO compiles it with dynamic height and width.
    """
    shape = ANY_SIZE_TIMING_SHAPE if any_size else INPUT_SHAPE
    batch_sizes = ANY_SIZE_BATCHES if any_size else batch_sizes
    options: dict[tuple[torch.memory_format, str], torch.nn.Module] = {}
    traces: dict[torch.memory_format, torch.jit.ScriptModule] = {}
    for memory_format in formats:
        copy_ = copy.deepcopy(model).to(memory_format=memory_format)  # .to converts parameters in place: one copy each
        example = torch.zeros((1, *shape)).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            traced = gil_free(copy_, example)
        if not isinstance(traced, torch.jit.ScriptModule):
            options[memory_format, "eager"] = traced  # tracing failed (logged)
            continue
        traces[memory_format] = traced
        if "trace" in forwards:
            options[memory_format, "trace"] = traced
        if "frozen" in forwards and (frozen_ := frozen(traced)) is not None:
            options[memory_format, "frozen"] = frozen_
    if "openvino" in forwards and not bf16:
        # From the NCHW trace where there is one: OpenVINO converts a trace 2-3x faster than a module (which it traces).
        if (compiled := openvino_forward(traces.get(torch.contiguous_format, model), torch.get_num_threads(), any_size)) is not None:
            options[torch.contiguous_format, "openvino"] = compiled  # reads NCHW
    if not options:  # no forward asked for is available: the first format's plain trace
        memory_format, traced = next(iter(traces.items()))
        options[memory_format, "trace"] = traced
    inputs = {(memory_format, size): torch.rand((size, *shape)).contiguous(memory_format=memory_format)
              for memory_format, _ in options for size in batch_sizes}
    for (memory_format, _), module in options.items():
        for size in batch_sizes:
            module(inputs[memory_format, size])  # oneDNN and OpenVINO pick and cache their kernels on the first call of a shape
    if len(options) == 1:  # nothing to choose between (a pinned or shared choice): warmed up, not timed
        (memory_format, forward), module = next(iter(options.items()))
        return module, memory_format, forward
    # Best of 3 runs per candidate and batch size, the runs interleaved: a burst of other work on the core slows one
    # run of every candidate rather than all of one candidate's runs (which once made a 20% faster forward lose).
    best = dict.fromkeys(((key, size) for key in options for size in batch_sizes), float("inf"))
    for _ in range(3):
        for key, size in best:
            batch, module = inputs[key[0], size], options[key]
            best[key, size] = min(best[key, size], best_seconds(lambda: module(batch), runs=1))  # noqa: B023 - called at once
    candidates = {key: sum(best[key, size] / size for size in batch_sizes) for key in options}
    memory_format, forward = min(candidates, key=candidates.__getitem__)
    return options[memory_format, forward], memory_format, forward


def best_seconds(call, runs: int) -> float:
    """The shortest wall time of `runs` calls of `call()`: the least disturbed by whatever else runs."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def pick_device(requested: str) -> torch.device:
    """auto: CUDA when present, else CPU; cuda without CUDA is a configuration error, said at startup."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("UPGRADER_DEVICE=cuda but torch sees no CUDA device")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_precision(requested: str, device: torch.device) -> str:
    """The forward pass's precision, "float32" or "bfloat16", for UPGRADER_PRECISION on `device`.

    auto picks bfloat16 only on a CPU that multiplies bf16 natively: there subpixel_residual 64x8 ran 1.8-1.9x
    faster at batch 64, one thread, and lost 0.0003 dB on CIFAR-10 (bench/bench_precision.py). On CUDA a 32x32
    forward is a few kernel launches, and bf16 there is unmeasured: auto keeps float32.
    """
    if requested == "auto":
        return "bfloat16" if device.type == "cpu" and native_bf16_cpu() else "float32"
    if requested == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"UPGRADER_PRECISION=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16")
        if device.type == "cpu" and not native_bf16_cpu():
            log.warning("UPGRADER_PRECISION=bfloat16 on a CPU without native bf16: emulated, slower than float32")
    return requested


def any_size_model(manifest: dict) -> bool:
    """Whether a version takes images of any size (its manifest's input_shape is [3, null, null], as trainer/photo.py
    publishes photo_residual): it runs on whole images, or large tiles of them (service.runtime.wholeimage), not 8x8 tiles."""
    shape = manifest.get("input_shape") or list(INPUT_SHAPE)
    return len(shape) == 3 and shape[1] is None and shape[2] is None


def ensemble_views(model, x: torch.Tensor, size: int) -> torch.Tensor:
    """`self_ensemble` one view at a time: the views of a non-square batch (turned a quarter) cannot be stacked."""
    total = None
    for turns, mirrored in VIEWS[size]:
        y = undo_dihedral(model(dihedral(x, turns, mirrored)).float(), turns, mirrored)
        total = y if total is None else total + y
    return total / size


BICUBIC_RADIUS = 2  # input pixels a bicubic skip reads on either side of an output pixel's position


def receptive_radius(model: torch.nn.Module) -> int:
    """An upper bound, in input pixels, of how far from an output pixel's position the model reads: the radii of all
    its convolutions added up (each layer widens the window by its own radius, residual connections do not), and at
    least the bicubic skip's."""
    radius = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            radius += max((k - 1) // 2 * d for k, d in zip(module.kernel_size, module.dilation, strict=True))
    return max(radius, BICUBIC_RADIUS)


@dataclass
class BatchOutput:
    images: np.ndarray  # uint8 N x 3 x 32 x 32 (N x 3 x 4H x 4W for an any-size model), exactly what the PNGs hold
    pngs: list[bytes | None]  # None where no PNG was asked for


class Upscaler:
    """One (model, version) on one device."""

    def __init__(self, store: ModelStore, name: str, version: int, device: torch.device, max_batch_images: int,
                 precision: str = "float32", png_level: int = 0, max_forward_pixels: int = 512 * 512):
        self.store, self.name, self.version, self.device = store, name, version, device
        self.max_batch_images, self.png_level = max_batch_images, png_level
        self.max_forward_pixels = max_forward_pixels  # an any-size model's input pixels per forward pass (batch_limit)
        self.any_size = False  # takes any H x W (any_size_model), known once the manifest is read
        self.halo = 0  # an any-size model's receptive radius in input pixels: the overlap its windows need (service.runtime.wholeimage)
        self.bf16 = precision == "bfloat16"  # the forward pass in bf16 (pick_precision)
        self.autocast = self.bf16  # predict's own autocast: off for a CPU trace made in bf16, which carries its casts
        self.model: torch.nn.Module | None = None
        self.manifest: dict = {}
        self.memory_format = torch.contiguous_format  # of the model's input, chosen at load on the CPU (fastest_cpu_forward)
        self.cpu_forwards = CPU_FORWARDS  # the CPU forwards fastest_cpu_forward may choose from (a bench's baseline narrows them)
        self.forward = "eager"  # what runs: eager, trace, frozen or openvino (chosen at load on the CPU)
        self.forward_source = "none"  # how it was chosen on the CPU: timed here, pinned (UPGRADER_CPU_FORWARD) or recorded (earlier, on this machine)
        self.forward_choices: ForwardChoices | None = None  # the recorded choices (service.runtime.forward_choices)
        self.fixed_cost_s = 0.0  # the part of a forward pass's time that does not grow with the batch (measure_fixed_cost)

    def setup(self) -> None:
        """Verify every artifact, rebuild the architecture and load the weights onto the device."""
        self.store.verify(self.name, self.version)
        self.model, self.manifest = self.store.load(self.name, self.version, self.device)
        self.any_size = any_size_model(self.manifest)
        self.halo = receptive_radius(self.model) if self.any_size else 0  # of the module, before it is traced or compiled
        if self.device.type == "cuda" and not self.any_size:
            # Batches go through pinned host buffers, allocated once (cudaHostAlloc is slow), so both
            # copies are asynchronous DMA.
            self._pinned_in = torch.empty((self.max_batch_images, *INPUT_SHAPE), dtype=torch.uint8).pin_memory()
            self._pinned_out = torch.empty((self.max_batch_images, *OUTPUT_SHAPE), dtype=torch.uint8).pin_memory()
        # The turn on the recorded choices (the manager always gives them; an Upscaler built alone has none) covers what
        # TIMING_LOCK covers, so a service's workers time one at a time too, and the second to set a version up takes
        # the first one's measurements.
        cpu = self.device.type == "cpu"
        records = self.forward_choices is not None and cpu
        with TIMING_LOCK, self.forward_choices.turn() if records else contextlib.nullcontext():
            key = f"{self.name}:{self.version}"
            wanted = signature(self.manifest.get("weights_sha256", ""), torch.get_num_threads(), self.bf16, self.cpu_forwards) if records else {}
            recorded = self.forward_choices.get(key, wanted) if records else None
            if cpu:  # on CUDA the forward is a few kernel launches: nothing to gain from a trace
                with torch.inference_mode():
                    self.choose_cpu_forward(recorded)
                self.autocast = self.bf16 and self.forward == "eager"  # eager if tracing failed
            # One image through the whole path now, so the first request does not pay for lazy initialisation.
            blank = codec.encode_png(np.zeros(INPUT_SHAPE, dtype=np.uint8))
            self.run_batch(codec.stack_images([self.decode(blank, 0)]))
            # The batcher's regrouping wait is this fixed cost: workers that measured it apart batched apart. An any-size
            # model's batches are sized by pixels (batch_limit), its forward dominated by them: no regrouping wait.
            self.fixed_cost_s = 0.0 if self.any_size else recorded["fixed_cost_s"] if recorded else self.measure_fixed_cost()
            if records and not recorded:
                self.forward_choices.put(key, wanted, forward=self.forward, memory_format=str(self.memory_format).removeprefix("torch."),
                                         fixed_cost_s=self.fixed_cost_s)

    def choose_cpu_forward(self, recorded: dict | None) -> None:
        """The forward and memory format to run: the one recorded for this signature (`recorded`), one candidate alone
        (pinned), or the fastest timed here."""
        if recorded:
            forwards, formats, self.forward_source = (recorded["forward"],), (MEMORY_FORMATS[recorded["memory_format"]],), "recorded"
        else:
            forwards, formats = self.cpu_forwards, tuple(MEMORY_FORMATS.values())
            self.forward_source = "pinned" if len(forwards) == 1 else "timed"  # pinned: its memory format may be timed
        self.model, self.memory_format, self.forward = fastest_cpu_forward(self.model, formats=formats, bf16=self.bf16, forwards=forwards,
                                                                           any_size=self.any_size)

    def batch_limit(self, shape: tuple[int, ...], ensemble: int) -> int:
        """Most images of `shape` (C x H x W) one forward pass takes: max_batch_images for 8x8 models; for an any-size
        model as many as fit in max_forward_pixels (counting the ensemble's views), at least one."""
        if not self.any_size:
            return self.max_batch_images
        pixels = shape[-2] * shape[-1] * ensemble
        return max(1, min(self.max_batch_images, self.max_forward_pixels // pixels))

    def measure_fixed_cost(self) -> float:
        """Seconds of a forward pass that do not grow with its batch: t(1) - (t(max) - t(1)) / (max - 1), best of a few runs.

        The batcher waits up to this long to merge two partial batches (service.runtime.batching). Measured
        here, one thread: conv ~0.15-0.21 ms, subpixel_residual ~0.6-0.95 ms, resnet18 ~6.2-6.8 ms (its 56 MB of weights are
        read once per pass, whatever the batch)."""
        if self.max_batch_images < 2:  # one image a batch: there is nothing to merge (and no room for two images)
            return 0.0
        largest = self.max_batch_images

        def best(count: int, runs: int) -> float:
            images = np.zeros((count, *INPUT_SHAPE), dtype=np.uint8)
            return best_seconds(lambda: self.run_batch(images, png=[False] * count), runs)

        one, full = best(1, 3), best(largest, 2)
        return max(0.0, one - (full - one) / (largest - 1))

    @staticmethod
    def decode(data: bytes, item: int, max_bytes: int | None = None) -> np.ndarray:
        return codec.decode_image(data, INPUT_SIZE, item, "image", max_bytes)

    def predict(self, batch: torch.Tensor, ensemble: int = 1) -> torch.Tensor:
        """float N x 3 x 8 x 8 in [0, 1] on the device -> float N x 3 x 32 x 32 (N x 3 x H x W -> 4H x 4W: any-size model)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            batch = batch.contiguous(memory_format=self.memory_format)
            if ensemble > 1 and batch.shape[-2] != batch.shape[-1]:
                return ensemble_views(lambda x: self.model(x.contiguous(memory_format=self.memory_format)), batch, ensemble)
            outputs = self_ensemble(self.model, batch, ensemble) if ensemble > 1 else self.model(batch)
        return outputs.float()

    def encode(self, images: np.ndarray) -> list[bytes]:
        """uint8 N x 3 x 32 x 32 -> one PNG each."""
        return codec.encode_pngs(images, self.png_level)

    def run_batch(self, images: np.ndarray, ensemble: int = 1, png: list[bool] | None = None) -> BatchOutput:
        """uint8 N x 3 x 8 x 8 -> outputs, and PNGs of those `png` marks (default all). Runs on the worker thread.

        Encoding holds the GIL (~7 us an image, codec.encode_pngs): it is skipped for outputs that leave
        as pixels (V2 tensors, tiles of a larger image)."""
        if len(images) > self.max_batch_images:  # on CUDA the pinned buffers hold max_batch_images: say so on every device
            raise ValueError(f"{self.name}:{self.version}: a batch of {len(images)} images; this upscaler takes at most "
                             f"{self.max_batch_images} (max_batch_images)")
        with torch.inference_mode():
            batch = torch.from_numpy(images)
            pinned = self.device.type == "cuda" and not self.any_size
            if pinned:
                staged = self._pinned_in[: len(images)]
                staged.copy_(batch)
                batch = staged.to(self.device, non_blocking=True)
            outputs = codec.quantize(self.predict(to_float(batch), ensemble)).contiguous()  # NCHW whatever the model's format
            if pinned:
                host = self._pinned_out[: len(outputs)]
                host.copy_(outputs, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
                pixels = host.numpy().copy()  # the buffer is reused by the next batch
            elif self.device.type == "cuda":
                pixels = outputs.cpu().numpy()
            else:
                pixels = outputs.numpy()
        if png is None or all(png):
            return BatchOutput(pixels, self.encode(pixels))
        pngs: list[bytes | None] = [None] * len(pixels)
        if wanted := [i for i, want in enumerate(png) if want]:  # a batch shared by PNG and pixel answers
            for i, data in zip(wanted, self.encode(pixels[wanted]), strict=True):
                pngs[i] = data
        return BatchOutput(pixels, pngs)
