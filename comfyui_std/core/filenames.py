"""File names built from user text (a node's ``filename_prefix``): checked in one place before anything is written.

A prefix is a relative path inside the output folder (subfolders allowed, ``STD/video``): no absolute path, no
``..``, no control characters (a NUL byte cut the name and left a stray file, a newline made a real newline in a
file name), at most :data:`MAX_PART` characters a part and :data:`MAX_PREFIX` in all (the file system's limit came
back as an OSError naming the server's folder).
"""

from __future__ import annotations

import posixpath
import unicodedata

from .errors import STDInputError

MAX_PART = 120
MAX_PREFIX = 200


def check_prefix(prefix, name: str = "filename_prefix") -> str:
    """The prefix, stripped and with ``/`` separators; raises :class:`STDInputError` naming ``name`` and the rule."""
    if not isinstance(prefix, str):
        raise STDInputError(name, f"expected text, got {type(prefix).__name__}")
    text = prefix.strip().replace("\\", "/")
    bad = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c)[0] == "C"})
    if bad:
        raise STDInputError(name, f"contains control characters ({', '.join(bad)}); use letters, digits, '-', '_' "
                                  "and '/' for subfolders")
    if len(text) > MAX_PREFIX:
        raise STDInputError(name, f"is {len(text)} characters long; at most {MAX_PREFIX}")
    normal = posixpath.normpath(text) if text else ""
    parts = normal.split("/")
    if not text or normal == "." or text.startswith("/") or parts[0] == ".." or ":" in parts[0]:
        raise STDInputError(name, f"'{prefix}' must be a name inside the output folder (subfolders allowed, e.g. "
                                  "STD/video)")
    long = [p for p in parts if len(p) > MAX_PART]
    if long:
        raise STDInputError(name, f"the part '{long[0][:20]}...' is {len(long[0])} characters long; at most "
                                  f"{MAX_PART} a part")
    return normal
