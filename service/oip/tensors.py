"""The Open Inference Protocol's tensor encodings (KServe V2 REST with the binary tensor data extension).

A body is a JSON inference header, optionally followed by raw tensor bytes: the header's length is
in the `Inference-Header-Content-Length` HTTP header and each binary tensor says its size in its
`binary_data_size` parameter, in the order of the tensors. Binary tensors are little-endian and row
major; a BYTES tensor is, per element, a 4-byte little-endian length and then that many bytes.

Everything here raises `TensorError` (an ApiError whose message names the tensor); each transport answers it
in its own form (REST: the protocol's `{"error": "..."}`, gRPC: INVALID_ARGUMENT and the same message).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib

import numpy as np

from service.errors import ApiError

HEADER_LENGTH = "inference-header-content-length"

# The numeric datatypes of the protocol and their little-endian numpy dtypes.
NUMPY_DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_DTYPES, "BYTES", "BF16")


class TensorError(ApiError):
    """A request's tensor is malformed; the message names it (400, or 413/415 for what is too large or not supported)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(status, "invalid_tensor", message)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """-> (JSON header, binary tail). Without the header-length header the whole body is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit():
        raise TensorError(f"Inference-Header-Content-Length must be a byte count, not {header_length!r}")
    length = int(header_length)
    if length > len(body):
        raise TensorError(f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo the Content-Encoding tritonclient may apply (gzip, deflate), never inflating past `limit` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise TensorError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)", 415)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise TensorError(f"the {encoding} body is corrupt ({exc})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise TensorError(f"the {encoding} body inflates past the body limit of {limit} bytes", 413)
    if not inflater.eof:
        raise TensorError(f"the {encoding} body is truncated")
    return data


class BinaryReader:
    """Hands out the binary tail tensor by tensor, in order, and checks that nothing is left over."""

    def __init__(self, tail: memoryview):
        self.tail, self.offset = tail, 0

    def take(self, size: int, name: str) -> memoryview:
        if size < 0 or self.offset + size > len(self.tail):
            raise TensorError(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                              f"({len(self.tail) - self.offset} binary bytes left)")
        chunk = self.tail[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        if self.offset != len(self.tail):
            raise TensorError(f"{len(self.tail) - self.offset} bytes after the last binary tensor: the binary_data_size "
                              "parameters do not add up to the body")


def element_count(shape: list[int], name: str) -> int:
    if any(dim < 0 for dim in shape):
        raise TensorError(f"input {name!r}: shape {shape} has a negative dimension")
    return math.prod(shape)


def numeric_from_binary(chunk: memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    count = element_count(shape, name)
    if len(chunk) != count * dtype.itemsize:
        raise TensorError(f"input {name!r}: {len(chunk)} binary bytes for shape {shape} of {datatype} "
                          f"(expected {count * dtype.itemsize})")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape).copy()  # a copy: torch wants writable memory


def numeric_from_json(data, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """JSON data (flat or nested, row major) -> array of `shape`, refusing values the datatype cannot hold."""
    dtype = NUMPY_DTYPES[datatype]
    count = element_count(shape, name)
    try:
        values = np.asarray(data, dtype=np.float64 if dtype.kind == "f" else object).reshape(-1)
    except (ValueError, TypeError):
        raise TensorError(f"input {name!r}: data is not a (nested) list of numbers") from None
    if values.size != count:
        raise TensorError(f"input {name!r}: {values.size} values for shape {shape} (expected {count})")
    if dtype.kind == "b" and not all(type(v) is bool for v in values):
        raise TensorError(f"input {name!r}: {datatype} data must be true/false")
    if dtype.kind in "iu":
        # Integral values are accepted in either JSON form (3 or 3.0: generated clients write numbers as
        # floats, and KServe's and MLServer's servers take them); a fraction is refused, naming the element.
        for index, value in enumerate(values):
            if type(value) is int:
                continue
            if type(value) is float and value.is_integer():
                values[index] = int(value)
                continue
            raise TensorError(f"input {name!r}: {datatype} data must be integers; element {index} is {echo_value(value)}")
        info = np.iinfo(dtype)
        if count and not (info.min <= min(values) and max(values) <= info.max):
            raise TensorError(f"input {name!r}: values outside the {datatype} range [{info.min}, {info.max}]")
    return values.astype(dtype).reshape(shape)


def echo_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def bytes_from_binary(chunk: memoryview, shape: list[int], name: str) -> list[bytes]:
    """A BYTES tensor's binary form (length-prefixed elements) -> its elements."""
    count, elements, offset = element_count(shape, name), [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise TensorError(f"input {name!r}: BYTES element {len(elements)} has a truncated length prefix")
        (size,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + size > len(chunk):
            raise TensorError(f"input {name!r}: BYTES element {len(elements)} declares {size} bytes but "
                              f"{len(chunk) - offset} are left")
        elements.append(bytes(chunk[offset : offset + size]))
        offset += size
    if len(elements) != count:
        raise TensorError(f"input {name!r}: {len(elements)} BYTES elements for shape {shape} (expected {count})")
    return elements


def bytes_from_json(data, shape: list[int], name: str) -> list[bytes]:
    """JSON BYTES elements are strings; binary content (an encoded image) travels base64-encoded (gRPC's typed
    contents carry the bytes themselves)."""
    flat = _flatten(data)
    if len(flat) != element_count(shape, name):
        raise TensorError(f"input {name!r}: {len(flat)} BYTES elements for shape {shape} (expected {element_count(shape, name)})")
    elements = []
    for index, text in enumerate(flat):
        if isinstance(text, bytes):  # gRPC's typed bytes_contents: the elements themselves
            elements.append(text)
            continue
        if not isinstance(text, str):
            raise TensorError(f"input {name!r}: BYTES element {index} is not a string")
        try:
            elements.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise TensorError(f"input {name!r}: BYTES element {index} is not base64 (send binary data, "
                              "or base64 in JSON)") from None
    return elements


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    return [leaf for item in data for leaf in _flatten(item)]


def bytes_to_binary(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)
