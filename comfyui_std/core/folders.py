"""The files of a folder a user names: one walk for every front end (image folders, frames of a video, the batch
CLI's input folders, a training data folder).

:func:`walk_files` is the definition; every folder walk of the project goes through it:

* only **regular files** are taken: a pipe or device would block or never end, so it is skipped with a notice;
* links are **resolved**, and what they lead to must stay inside the folder: a link to a file elsewhere would let a
  client read what the folder's owner never put there. Where the folder belongs to a server (the ComfyUI nodes) such
  a link is refused with a message naming it (``outside="refuse"``); where it is the user's own (the batch CLI, the
  trainer) it is skipped with a notice (``outside="skip"``);
* dangling links and **link loops** are skipped with a notice, and a folder reached twice through links is read once;
* ``exclude`` folders (a run's own output inside its input or data folder) are not read, with a notice;
* hidden names (``.name``: partial outputs, editor and OS files) are skipped silently, as every file browser does.

Reading a file (and its size limit) is the reader's business: images, videos and captions each check their own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import STDInputError


def walk_files(root: Path, *, recursive: bool = False, suffixes: tuple[str, ...] | None = None,
               exclude: tuple[Path, ...] = (), outside: str = "skip", name: str = "folder",
               hidden: bool = False) -> tuple[list[Path], list[str]]:
    """The regular files under ``root`` (directly inside it, or in every subfolder when ``recursive``), sorted by
    path, and notices for what was left out (see the module docstring).

    Args:
        suffixes: keep only these (lower case, with the dot); None keeps every file.
        exclude: folders never read (with a notice when the walk meets them).
        outside: ``"skip"`` a link that leads out of ``root`` (with a notice) or ``"refuse"`` it
            (:class:`STDInputError` named ``name``).
        hidden: also take names that start with a dot.
    """
    if outside not in ("skip", "refuse"):
        raise ValueError(f"outside must be 'skip' or 'refuse', not {outside!r}")
    root = Path(root)
    real_root = root.resolve()
    skip = [Path(e).resolve() for e in exclude]
    files: list[Path] = []
    notices: list[str] = []
    seen: set[Path] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        here = Path(folder).resolve()
        if folder != str(root):
            problem = (f"{folder} is the run's own output folder: not read" if any(here.is_relative_to(e) for e in skip)
                       else f"{folder} links back into a folder already read: skipped" if here in seen
                       else f"{folder} links out of '{root.name}' (to {here}): skipped"
                       if not here.is_relative_to(real_root) else None)
            if problem:
                notices.append(problem)
                dirs[:] = []
                continue
        seen.add(here)
        dirs[:] = sorted(d for d in dirs if hidden or not d.startswith(".")) if recursive else []
        for entry in sorted(names):
            path = Path(folder) / entry
            if (not hidden and entry.startswith(".")) or (suffixes is not None and path.suffix.lower() not in suffixes):
                continue
            try:
                real = path.resolve(strict=True)
                mode = real.stat().st_mode
            except (OSError, RuntimeError):  # a dangling link or a link loop
                notices.append(f"{path} is a broken or circular link: skipped")
                continue
            if any(real.is_relative_to(e) for e in skip):
                notices.append(f"{path} is in the run's own output folder: not read")
            elif not real.is_relative_to(real_root):
                if outside == "refuse":
                    raise STDInputError(name, f"'{entry}' in '{root.name}' links to a file outside the folder; copy "
                                              "the file into the folder instead")
                notices.append(f"{path} links out of '{root.name}' (to {real}): skipped")
            elif not stat.S_ISREG(mode):
                notices.append(f"{path} is not a regular file (a pipe, socket or device): skipped")
            else:
                files.append(path)
    return sorted(files), notices


def folder_files(folder: Path, suffixes: tuple[str, ...], name: str = "folder") -> list[Path]:
    """The regular files directly inside a folder a server client named, with one of ``suffixes``: links out of it
    are refused (:class:`STDInputError` named ``name``), anything else left out is skipped."""
    return walk_files(folder, suffixes=suffixes, outside="refuse", name=name, hidden=True)[0]
