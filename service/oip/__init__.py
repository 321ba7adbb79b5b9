"""The Open Inference Protocol (KServe V2), one core for both transports.

`protocol` holds what the protocol says: metadata, model configuration, readiness, and inference from a
transport-neutral `InferRequest` to an `Inferred` result, on the same lease, admission, pipeline and
metrics as `/upscale`. The transports are thin adapters over it: REST in service.api.routes.inference
(JSON and the binary tensor data extension), gRPC in service.grpc.server (protobuf). Neither imports the other.
"""
