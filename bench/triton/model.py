"""Triton Python-backend model: one Upgrader model version from the store, for bench/bench_triton.py.

Triton's dynamic batcher merges requests; `execute` gets the merged list, runs one forward pass
over all their images (as the Upgrader batcher does) and splits the outputs back. The model
repository's config.pbtxt names the store, model and version in its `parameters`.
"""

import json
import os
import sys
from pathlib import Path

# The backend's stub process does not inherit PYTHONPATH: the bench writes the project root and the
# venv's site-packages (torch, safetensors, ...) next to this file.
sys.path[:0] = Path(__file__).with_name("sys_path.txt").read_text().split()

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from model_store import ModelStore
from upgrader.imaging import to_float


class TritonPythonModel:
    def initialize(self, args):
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        torch.set_num_threads(int(parameters.get("torch_threads", "1")))
        self.model, manifest = ModelStore(parameters["store"]).load(parameters["model"], int(parameters["version"]))
        self.model.eval()
        if parameters.get("forward", "eager") == "openvino":  # bench_triton.py --triton-forward openvino
            from service.runtime.openvino_forward import openvino_forward

            self.model = openvino_forward(self.model, torch.get_num_threads())
            if self.model is None:
                raise RuntimeError(f"{parameters['model']}: OpenVINO could not compile it (see the log)")
        pb_utils.Logger.log_info(f"pid {os.getpid()}: {parameters['model']} v{manifest['version']} loaded, torch threads {torch.get_num_threads()}, "
                           f"forward {parameters.get('forward', 'eager')}")

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        sizes = [len(a) for a in arrays]
        with torch.inference_mode():
            batch = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
            pixels = self.model(to_float(batch)).mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
        responses, start = [], 0
        for size in sizes:
            output = pb_utils.Tensor("output", pixels[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
            start += size
        return responses
