"""KServe's own Python SDK (`kserve`) against a running server: `python tests/kserve_client.py rest|grpc URL MODEL IN.npy OUT.npy`.

Run as a subprocess by the tests: kserve's generated gRPC module and tritonclient.grpc's both register
the protocol's messages (`inference.ModelInferRequest`, ...) in protobuf's one default descriptor
pool, so the two cannot be imported into one process. Prints a JSON line with the health answers
and the response's model name and version; the output tensor goes to OUT.npy. With `--bad-dtype`
it sends the pixels as INT32 instead and prints the error.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["rest", "grpc"])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--version")
    parser.add_argument("--key")
    parser.add_argument("--bad-dtype", action="store_true")
    args = parser.parse_args()
    images = np.load(args.inputs)
    datatype = "INT32" if args.bad_dtype else "UINT8"
    tensor = InferInput("input", list(images.shape), datatype)
    tensor.set_data_from_numpy(images.astype(np.int32) if args.bad_dtype else images, binary_data=True)
    request = InferRequest(model_name=args.model, infer_inputs=[tensor], model_version=args.version, request_id="kserve-1")
    report: dict = {}
    if args.transport == "rest":
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        headers = {"authorization": f"Bearer {args.key}"} if args.key else None
        report["live"] = await client.is_server_live(args.url)
        report["ready"] = await client.is_server_ready(args.url)
        report["model_ready"] = await client.is_model_ready(args.url, args.model, headers=headers)
        call = client.infer(args.url, request, model_name=args.model, headers=headers)
    else:
        client = InferenceGRPCClient(args.url, retries=2)  # its retry policy wants at least 2 attempts
        headers = [("authorization", f"Bearer {args.key}")] if args.key else None
        report["live"] = await client.is_server_live()
        report["ready"] = await client.is_server_ready()
        report["model_ready"] = await client.is_model_ready(args.model)
        call = client.infer(request, headers=headers)
    try:
        response = await call
    except Exception as exc:  # the test asserts on the message
        report["error"] = f"{type(exc).__name__}: {exc}"
    else:
        output = response.outputs[0]
        report.update(model_name=response.model_name, model_version=response.model_version, id=response.id,
                      output=output.name, datatype=output.datatype, shape=list(output.shape))
        np.save(args.outputs, output.as_numpy())
    finally:
        await client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
