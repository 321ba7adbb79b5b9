"""The protocol's messages, built from grpc_predict_v2.binpb (compiled by grpcio-tools from grpc_predict_v2.proto
and the model_config.proto it imports: Triton's ModelConfig RPC and its messages).

They live in a descriptor pool of their own, not protobuf's default one: tritonclient.grpc and kserve register
the same names (`inference.ModelInferRequest`, ...) in the default pool, and two registrations of one name
in one process fail. So the service can share a process with either client (the tests do), and the
messages are the same on the wire. To regenerate after editing either .proto:

    python -m grpc_tools.protoc -Iservice/grpc --include_imports --descriptor_set_out=service/grpc/grpc_predict_v2.binpb service/grpc/grpc_predict_v2.proto
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
MODEL_CONFIG_PROTO = Path(__file__).with_name("model_config.proto")
DESCRIPTOR_SET = Path(__file__).with_name("grpc_predict_v2.binpb")
SERVICE = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
# --include_imports puts model_config.proto first: each file's imports are in the pool before it.
for _file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file:
    _pool.Add(_file)


def _message(name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferResponse = _message("ModelInferResponse")
ModelConfig = _message("ModelConfig")
ModelConfigResponse = _message("ModelConfigResponse")

# rpc name -> (request class, response class), as the service declares them (the repository RPCs are left out: not served).
METHODS = {method.name: (message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(method.output_type))
           for method in _pool.FindServiceByName(SERVICE).methods if not method.name.startswith("Repository")}
