"""Open Inference Protocol (KServe V2) request and response models: what /v2 clients send and get."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, Any]


class ProtocolError(BaseModel):
    error: str = Field(description="What is wrong, naming the offending model, input or element.",
                       examples=["input 'input': shape [2, 3, 8] is not [N, 3, 8, 8]"])


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="Protocol extensions this server supports.")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: a variable dimension (the batch).")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="Versions available (one, when a version was named).")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(None, description="`binary_data_size`: the tensor's bytes follow the JSON header.")
    data: Any = Field(None, description="Row-major values (flat or nested); BYTES elements as base64 strings. Absent with binary data.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: Parameters | None = Field(None, description="`binary_data`: return this output as binary data after the JSON.")


class InferenceRequest(BaseModel):
    # Unknown top-level fields are ignored: KServe's SDK repeats `model_name` (and may add `model_version`)
    # in the body although the path names the model. Inputs and outputs stay strict: a misspelt
    # tensor field (say `parameter`) would otherwise be dropped without a word.
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: Parameters | None = Field(None, description="`binary_data_output`: every output as binary data.")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Outputs wanted; absent: all of them.")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]
