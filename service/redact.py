"""What metadata may say over HTTP: no host paths.

Manifests record the trainer's arguments (data, cache, store and checkpoint directories) and
refusal reasons can name files; served as they are, they would tell any client the host's
directory layout. Before answering, every absolute path is cut to its last component (the
dataset or file name, which is what a client can use) and paths inside messages likewise.
"""

from __future__ import annotations

import re
from typing import Any

# An absolute POSIX path (/a/b, ~/a) or a Windows one (C:\\a); it ends at whitespace, a quote or a bracket.
_PATH_IN_TEXT = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\](?:[^\s'\"()\[\]{},;/\\]+[/\\])+([^\s'\"()\[\]{},;/\\]*)")
_WHOLE_PATH = re.compile(r"^(?:~|[A-Za-z]:)?[/\\]")


def scrub_text(text: str) -> str:
    """`sha256 mismatch in /srv/store/conv/3/weights.safetensors` -> `sha256 mismatch in weights.safetensors`."""
    return _PATH_IN_TEXT.sub(lambda m: m.group(1) or "/", text)


def public(value: Any) -> Any:
    """A JSON-like value with every host path reduced to its last component."""
    if isinstance(value, str):
        if _WHOLE_PATH.match(value):
            return value.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "/"
        return scrub_text(value) if "/" in value or "\\" in value else value
    if isinstance(value, dict):
        return {key: public(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(item) for item in value]
    return value
