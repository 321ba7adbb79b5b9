"""multipart/form-data bodies -> their parts, in memory, by python-multipart's parser (what Starlette uses).

Starlette's `request.form()` parses on the event loop as the body streams in and gives every file
part its own SpooledTemporaryFile: 3 ms of event-loop time for a 64-image body, during which no
other request (not even a refusal) is answered. Here the body is parsed as bytes, synchronously,
so a large one can be parsed off the loop (service.routers.upscale), and parts are kept as bytes
(they are limited to `max_part_bytes`, 64 KB by default), ~10x cheaper than the temporary files.

python-multipart's parser calls back into Python for every header and data run: 0.8 ms for a 64-image
body, all of it holding the GIL, which the worker's event loop then waits for (service.codec's
docstring). The bodies clients send are nearly always the plain shape (`_split`): no preamble or
epilogue, each part headed by `Content-Disposition: form-data; name="..."[; filename="..."]`. Those
are cut with bytes.split (~0.1 ms); anything else, malformed or over a limit, goes to python-multipart,
which decides and names the error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ApiError


@dataclass
class Part:
    name: str
    filename: str | None  # None: a text field, not a file part
    data: bytearray = field(default_factory=bytearray)


class TooManyParts(Exception):
    """More than `max_parts` parts: the caller says how many it accepts."""


class _TooLarge(Exception):
    def __init__(self, part: Part, index: int) -> None:
        self.part, self.index = part, index


def boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or 400."""
    _, options = parse_options_header(content_type)
    value = options.get(b"boundary")
    if not value:
        raise ApiError(400, "invalid_multipart", "malformed multipart body: the Content-Type has no boundary")
    return value


_DISPOSITION = re.compile(rb'form-data; name="([^"\\\r\n]*)"(?:; filename="([^"\\\r\n]*)")?')


def _split(body: bytes, boundary: bytes, max_parts: int, max_part_bytes: int) -> list[Part] | None:
    """The parts of a body in the plain shape, within the limits, or None (python-multipart decides)."""
    opening, delimiter = b"--" + boundary + b"\r\n", b"\r\n--" + boundary
    if not body.startswith(opening):
        return None
    pieces = body[len(opening) - 2:].split(delimiter)  # each part's piece: b"\r\n" + headers + b"\r\n\r\n" + data
    if pieces[-1] not in (b"--", b"--\r\n") or not 0 < len(pieces) - 1 <= max_parts:
        return None
    parts = []
    for piece in pieces[:-1]:
        head, found, data = piece.partition(b"\r\n\r\n")
        if not found or not head.startswith(b"\r\n") or len(data) > max_part_bytes:
            return None
        disposition = None
        for line in head[2:].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                return None
            if name.lower() == b"content-disposition":
                disposition = _DISPOSITION.fullmatch(value.strip())
        if disposition is None:
            return None
        field_name, filename = disposition.groups()
        parts.append(Part(field_name.decode("utf-8", "replace"), None if filename is None else filename.decode("utf-8", "replace"),
                          bytearray(data)))
    return parts


def parse(body: bytes, content_type: str, max_parts: int, max_part_bytes: int) -> list[Part]:
    """Every part of `body`, in order; 400 for a malformed body, 413 for a part over `max_part_bytes`, TooManyParts past `max_parts`."""
    separator = boundary(content_type)
    if (plain := _split(body, separator, max_parts, max_part_bytes)) is not None:
        return plain
    return _parse_any(body, separator, max_parts, max_part_bytes)


def _parse_any(body: bytes, separator: bytes, max_parts: int, max_part_bytes: int) -> list[Part]:
    """`parse` by python-multipart's parser: any body the standard allows, and the errors of those it does not."""
    parts: list[Part] = []
    header_name, header_value = bytearray(), bytearray()
    disposition = b""

    def on_part_begin() -> None:
        nonlocal disposition
        disposition = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        nonlocal disposition
        if header_name.lower() == b"content-disposition":
            disposition = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise MultipartParseError('a part has no Content-Disposition "name"')
        if len(parts) >= max_parts:
            raise TooManyParts
        filename = options.get(b"filename")
        parts.append(Part(options[b"name"].decode("utf-8", "replace"), None if filename is None else filename.decode("utf-8", "replace")))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        if len(part.data) + end - start > max_part_bytes:
            raise _TooLarge(part, sum(p.name == part.name for p in parts) - 1)
        part.data.extend(data[start:end])

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data}
    try:
        parser = MultipartParser(separator, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}") from None
    except _TooLarge as exc:
        raise ApiError(413, "image_too_large", f"{exc.part.name} part {exc.index} is larger than {max_part_bytes} bytes", exc.index) from None
    return parts
