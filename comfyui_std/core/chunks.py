"""Chunking: a clip is sampled in chunks of ``frames_per_batch`` frames that share ``overlap`` frames, and the
overlaps are cross-faded. :class:`Chunking` is the one place those settings (and the noise policy that goes with
them) are checked; the in-memory loop (:func:`~.stylize.stylize_chunks`), the streamed loop
(:func:`~.stream.stream_stylize`), the ComfyUI nodes, the app and the batch CLI take a ``Chunking``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import check_range
from .noise import check_noise_mode

#: the most frames sampled together (a node widget's maximum, the app's and the CLI's limit)
MAX_FRAMES_PER_BATCH = 4096


@dataclass(frozen=True)
class Chunking:
    """How a clip is cut into chunks, checked once when made.

    Args:
        frames_per_batch: frames sampled together, 1..:data:`MAX_FRAMES_PER_BATCH`; ``None``: the whole batch at
            once (an image batch).
        overlap: frames shared by consecutive chunks and cross-faded, below ``frames_per_batch``.
        noise: ``"shared"`` (one start noise for every frame) or ``"per_frame"`` (see :mod:`.noise`).
    """

    frames_per_batch: int | None = 16
    overlap: int = 0
    noise: str = "shared"

    def __post_init__(self):
        if self.frames_per_batch is None:
            fpb = None
            overlap = check_range("overlap", self.overlap, 0, 0, kind=int)
        else:
            fpb = check_range("frames_per_batch", self.frames_per_batch, 1, MAX_FRAMES_PER_BATCH, kind=int)
            overlap = check_range("overlap", self.overlap, 0, fpb - 1, kind=int)
        object.__setattr__(self, "frames_per_batch", fpb)
        object.__setattr__(self, "overlap", overlap)
        object.__setattr__(self, "noise", check_noise_mode(self.noise))

    def batch(self, num_frames: int) -> int:
        """Frames per chunk for a clip of ``num_frames`` (the whole clip when it is shorter or unchunked)."""
        return num_frames if self.frames_per_batch is None else min(self.frames_per_batch, num_frames)

    def ranges(self, num_frames: int) -> list[tuple[int, int]]:
        """[start, end) ranges covering ``num_frames`` (see :func:`chunk_ranges`)."""
        return chunk_ranges(num_frames, self.frames_per_batch or num_frames, self.overlap)

    def as_dict(self) -> dict:
        return {"frames_per_batch": self.frames_per_batch, "overlap": self.overlap, "noise": self.noise}


def chunk_ranges(num_frames: int, frames_per_batch: int, overlap: int = 0) -> list[tuple[int, int]]:
    """[start, end) ranges covering ``num_frames`` in chunks of ``frames_per_batch`` sharing ``overlap`` frames."""
    num_frames = check_range("frames", num_frames, 1, 10_000_000, kind=int)
    fpb, overlap = int(frames_per_batch), int(overlap)
    if not 0 <= overlap < fpb:
        raise ValueError(f"chunks of {fpb} frames cannot share {overlap}")  # a Chunking checks this for users
    if num_frames <= fpb:
        return [(0, num_frames)]
    step = fpb - overlap
    ranges, start = [], 0
    while True:
        end = min(start + fpb, num_frames)
        ranges.append((max(0, end - fpb), end))
        if end == num_frames:
            return ranges
        start += step


class ChunkBlender:
    """Cross-fade consecutive overlapping chunks as they arrive, handing back each frame once it is final.

    Chunks come in the order of :func:`chunk_ranges`. :meth:`push` blends a chunk's leading frames (the ones it
    shares with earlier chunks) into the frames still pending with linear ramps, copies the rest, and returns the
    frames before ``next_start`` (the start of the next chunk, which cannot touch them); the last push (no
    ``next_start``) returns everything left. Only the overlap is ever held back, so a streamed clip needs memory
    for one chunk, not for the whole clip, and the result is exactly :func:`blend_chunks`.
    """

    def __init__(self):
        self.pending: torch.Tensor | None = None  # frames [self.start, self.end) not handed out yet
        self.start = 0
        self.end = 0

    def push(self, start: int, end: int, chunk: torch.Tensor, next_start: int | None = None) -> torch.Tensor:
        if start < self.start or start > self.end or end - start != chunk.shape[0] or end < self.end:
            raise ValueError(f"chunk [{start}, {end}) does not continue the frames [{self.start}, {self.end})")
        ov = self.end - start
        if self.pending is None:
            buf = chunk.clone()
        else:
            buf = torch.empty((end - self.start, *chunk.shape[1:]), dtype=chunk.dtype)
            buf[: self.end - self.start] = self.pending
            if ov:
                w = torch.linspace(0, 1, ov + 2)[1:-1].to(chunk.dtype).view((ov,) + (1,) * (chunk.ndim - 1))
                lo = start - self.start
                buf[lo:lo + ov] = buf[lo:lo + ov] * (1 - w) + chunk[:ov] * w
            buf[self.end - self.start:] = chunk[ov:]
        self.end = end
        cut = (end if next_start is None else next_start) - self.start
        done, self.pending = buf[:cut], buf[cut:]
        self.start += cut
        return done


def blend_chunks(num_frames: int, ranges, chunks) -> torch.Tensor:
    """Cross-fade overlapping chunk outputs (frame axis 0) with linear ramps; non-overlapping frames are copied.

    ``ranges`` come from :func:`chunk_ranges` (consecutive), ``chunks`` are the outputs for them, in order.
    """
    blender, parts = ChunkBlender(), []
    for i, ((s, e), chunk) in enumerate(zip(ranges, chunks)):
        parts.append(blender.push(s, e, chunk, ranges[i + 1][0] if i + 1 < len(ranges) else None))
    out = torch.cat(parts)
    if out.shape[0] != num_frames:
        raise ValueError(f"the chunks cover {out.shape[0]} frames, expected {num_frames}")
    return out
