"""The files of a folder a user names (a folder of images, the frames of a video): one walk for every front end.

Only regular files directly inside the folder are read, each must stay inside it once links are resolved: a link to
a file elsewhere would let a client read what the folder's owner never put there (refused with a message naming the
file), and a pipe or device would block or never end (skipped).
"""

from __future__ import annotations

import stat
from pathlib import Path

from .errors import STDInputError


def folder_files(folder: Path, suffixes: tuple[str, ...], name: str = "folder") -> list[Path]:
    """The regular files of ``folder`` with one of ``suffixes`` (lower case, with the dot), unsorted. Raises
    :class:`STDInputError` (``name``) for a file that links outside the folder."""
    folder = Path(folder)
    root = folder.resolve()
    out = []
    for path in folder.iterdir():
        if path.suffix.lower() not in suffixes:
            continue
        try:
            real = path.resolve(strict=True)
            mode = real.stat().st_mode
        except (OSError, RuntimeError):  # a dangling link or a link loop: not a file to read
            continue
        if real.parent != root:
            raise STDInputError(name, f"'{path.name}' in '{folder.name}' links to a file outside the folder; copy the "
                                      "file into the folder instead")
        if stat.S_ISREG(mode):
            out.append(path)
    return out
