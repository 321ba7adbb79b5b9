"""multipart/form-data bodies -> their parts, in memory, by the `multipart` library's push parser.

Starlette's `request.form()` parses on the event loop as the body streams in and gives every file
part its own SpooledTemporaryFile: 3 ms of event-loop time for a 64-image body, during which no
other request (not even a refusal) is answered. Here the whole body, once read, goes to a parser
synchronously, so a large one can be parsed off the loop (service.api.routes.upscale), and parts are
kept as bytes (they are limited to `max_part_bytes`, 64 KB by default).

The parser is `multipart` (the one Bottle uses) rather than python-multipart (the one Starlette uses):
it finds boundaries with bytes.find instead of calling back into Python for every header and data run,
so a one-image body takes 7 us instead of 18 and a 64-image body 0.28 ms instead of 0.68, time the
event loop (or the helper thread holding the GIL) spends on every upscale request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import multipart

from service.errors import ApiError


@dataclass
class Part:
    name: str
    filename: str | None  # None: a text field, not a file part
    data: bytearray = field(default_factory=bytearray)


class TooManyParts(Exception):
    """More than `max_parts` parts: the caller says how many it accepts."""


def boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or 400."""
    _, options = multipart.parse_options_header(content_type)
    value = options.get("boundary")
    if not value:
        raise ApiError(400, "invalid_multipart", "malformed multipart body: the Content-Type has no boundary")
    return value.encode("latin-1")


def parse(body: bytes, content_type: str, max_parts: int, max_part_bytes: int) -> list[Part]:
    """Every part of `body`, in order; 400 for a malformed body, 413 for a part over `max_part_bytes`, TooManyParts past `max_parts`."""
    parts: list[Part] = []
    part: Part | None = None
    try:
        # Leaving the block checks that the stream ended (a truncated body is malformed).
        with multipart.PushMultipartParser(boundary(content_type), content_length=len(body)) as parser:
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    if len(parts) >= max_parts:
                        raise TooManyParts
                    part = Part(event.name, event.filename)
                    parts.append(part)
                elif event:  # a chunk of the current part's data
                    if len(part.data) + len(event) > max_part_bytes:
                        index = sum(p.name == part.name for p in parts) - 1
                        raise ApiError(413, "image_too_large", f"{part.name} part {index} is larger than {max_part_bytes} bytes", index)
                    part.data += event
    except multipart.MultipartError as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}") from None
    return parts
