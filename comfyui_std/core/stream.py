"""Streamed video stylization: decode, encode, stylize, decode and write a clip chunk after chunk, in constant memory.

The in-memory path (:func:`~.stylize.stylize_chunks`) holds every frame of a clip at once: the frames, their
latents, the noise and the output. :func:`stream_stylize` runs the same chunk loop on a stream: it reads frames a
few at a time, VAE-encodes them in blocks, samples each chunk as soon as its frames (and a little read-ahead) are
there, cross-fades the overlaps with the incremental :class:`~.chunks.ChunkBlender`, decodes finished frames and hands
them to a writer, then forgets them. Memory follows ``frames_per_batch`` (plus one VAE block and the read-ahead),
not the clip length. For the same settings the output is **identical** to the in-memory path that encodes the
frames in blocks of ``vae_batch``, runs :func:`~.stylize.stylize_chunks` and decodes in blocks of ``vae_batch``
(what the Gradio app's ``STDEngine.run`` does with ``vae_batch = frames_per_batch``):

* the chunks are :meth:`~.chunks.Chunking.ranges` of the whole clip although its length is only known at the end: the
  loop reads ``max(step, 2 * noise group)`` frames past each chunk before sampling it, which is enough to know
  whether the next chunk is the last one (the last chunk is pulled back to a full ``frames_per_batch`` and so
  overlaps its predecessor more);
* the start noise is :class:`~.noise.StartNoise`: the values of :func:`~.noise.start_noise` for the whole
  clip (one ``torch.randn`` draw with ``noise="per_frame"``), drawn a few frames at a time;
* the per-step noise (gamma > 0) restarts from the seed for every chunk in both paths;
* the VAE sees the same blocks of ``vae_batch`` frames, aligned at frame 0, when encoding and when decoding.

Front ends pass their own callables, so the Gradio app (diffusers VAE + the core sampler), the batch CLI and a
ComfyUI node (ComfyUI's VAE + ``comfy.sample.sample_custom``) share this loop:

* ``encode(frames [b, H, W, 3] float 0..1) -> latents [b, C, h, w]`` (tiled VAE encoding goes here);
* ``run_chunk(start, end, latents, noise) -> stylized latents [end - start, C, h, w]``: ``latents`` are the chunk's
  clean latents, ``noise`` its start noise (add ``sigmas[0] * noise`` and sample); e.g.
  :func:`~.stylize.std_chunk_runner`, or a closure around ``comfy.sample.sample_custom(model, noise, cfg, sampler,
  sigmas, positive, negative, latents, ...)`` with the chunk's rows of per-frame masks/hints
  (:func:`~.stylize.frames_of`);
* ``decode(latents [b, C, h, w]) -> frames [b, H, W, 3] float 0..1``;
* ``write(frames)``, e.g. :meth:`~.video.VideoWriter.write`.

:func:`stylize_video_file` wires a :class:`~.video.VideoReader`, a :class:`~.video.VideoWriter` (temporary file,
renamed when complete) and the source's audio around the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .audio import AudioFile
from .errors import STDInputError, check_range
from .chunks import ChunkBlender, Chunking
from .noise import StartNoise
from .video import VideoReader, VideoWriter

#: the container a stylized video is written in, by source container ("folder": a folder of frames)
OUTPUT_FORMATS = {"mp4": "mp4", "mov": "mov", "mkv": "mkv", "webm": "webm", "avi": "avi", "gif": "gif",
                  "folder": "mp4"}

Progress = Callable[[int, "int | None"], None]


@dataclass
class StreamResult:
    frames: int  # frames written
    chunks: int  # chunks sampled


def _blocks(frames: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of frame batches into batches of exactly ``size`` frames (the last may be shorter)."""
    pending, count = [], 0
    for batch in frames:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[-1] != 3:
            raise STDInputError("frames", "expected frame batches [frames, height, width, 3]")
        while batch.shape[0]:
            take = min(size - count, batch.shape[0])
            pending.append(batch[:take])
            count += take
            batch = batch[take:]
            if count == size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, count = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


class _Window:
    """Consecutive per-frame tensors [first, end) kept in blocks; older frames are released."""

    def __init__(self):
        self.blocks: list[tuple[int, torch.Tensor]] = []
        self.end = 0

    def append(self, t: torch.Tensor) -> None:
        self.blocks.append((self.end, t))
        self.end += t.shape[0]

    def get(self, start: int, end: int) -> torch.Tensor:
        parts = [t[max(start - s, 0):min(end, s + t.shape[0]) - s] for s, t in self.blocks
                 if s < end and s + t.shape[0] > start]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def release(self, before: int) -> None:
        self.blocks = [(s, t) for s, t in self.blocks if s + t.shape[0] > before]

    def take(self, n: int) -> torch.Tensor:
        """Remove and return the first ``n`` frames."""
        first = self.blocks[0][0]
        out = self.get(first, first + n)
        rest = [(s, t) for s, t in self.blocks if s + t.shape[0] > first + n]
        if rest and rest[0][0] < first + n:
            s, t = rest[0]
            rest[0] = (first + n, t[first + n - s:])
        self.blocks = rest
        return out

    def __len__(self) -> int:
        return self.end - self.blocks[0][0] if self.blocks else 0


def stream_stylize(frames: Iterable[torch.Tensor], *, encode: Callable, run_chunk: Callable, decode: Callable,
                   write: Callable, seed: int, chunking: Chunking = Chunking(), vae_batch: int | None = None,
                   total: int | None = None, progress: Progress | None = None) -> StreamResult:
    """Stylize a stream of frames chunk by chunk and hand the results to ``write`` in order (see the module doc).

    Args:
        frames: frame batches ``[n, H, W, 3]`` in 0..1, any ``n`` (e.g. ``reader.chunks(vae_batch)``).
        encode, run_chunk, decode, write: the front end's callables (module doc).
        seed: seed of the start noise (and, inside ``run_chunk``, of the per-step noise).
        chunking: frames sampled together, their overlap and the noise policy (``frames_per_batch`` must be set).
        vae_batch: frames per ``encode`` / ``decode`` call (default ``frames_per_batch``).
        total: the expected frame count for ``progress`` until the real one is known (e.g.
            ``reader.info.frame_estimate``), or None.
        progress: ``progress(frames_written, total)`` after every chunk; ``total`` is exact once the stream has
            ended, before that the ``total`` given here.

    Returns:
        :class:`StreamResult` (frames written, chunks sampled).
    """
    if chunking.frames_per_batch is None:
        raise ValueError("a streamed clip needs chunks of a set frames_per_batch")
    fpb, overlap = chunking.frames_per_batch, chunking.overlap
    vae_batch = check_range("vae_batch", vae_batch or fpb, 1, 100_000, kind=int)
    step = fpb - overlap
    source = _blocks(frames, vae_batch)
    latents, finished = _Window(), _Window()
    state = {"eof": False, "noise": None}

    def pull() -> None:
        block = next(source, None)
        if block is None:
            state["eof"] = True
            return
        z = encode(block)
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[0] != block.shape[0]:
            raise ValueError(f"encode returned {getattr(z, 'shape', type(z))} for {block.shape[0]} frames")
        if state["noise"] is None:
            state["noise"] = StartNoise(z.shape[1:], seed, chunking.noise, z.dtype)
        latents.append(z)

    def ensure(n: int) -> None:
        while not state["eof"] and latents.end < n:
            pull()

    def flush(final: bool) -> int:
        written = 0
        while len(finished) >= vae_batch or (final and len(finished)):
            z = finished.take(min(vae_batch, len(finished)))
            out = decode(z)
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != z.shape[0]:
                raise ValueError(f"decode returned {getattr(out, 'shape', type(out))} for {z.shape[0]} latents")
            write(out)
            written += out.shape[0]
        return written

    ensure(1)
    if latents.end == 0:
        raise STDInputError("video", "no frames to stylize")
    group = state["noise"].group
    blender, written, i = ChunkBlender(), 0, 0
    while True:
        p = i * step
        ensure(p + fpb + max(step, 2 * group))
        n = latents.end
        if not state["eof"]:
            (s, e), nxt = (p, p + fpb), p + step
        else:
            ranges = chunking.ranges(n)
            (s, e), nxt = ranges[i], (ranges[i + 1][0] if i + 1 < len(ranges) else None)
        chunk_noise = state["noise"].frames(s, e, n if state["eof"] else None)
        out = run_chunk(s, e, latents.get(s, e), chunk_noise)
        if not isinstance(out, torch.Tensor) or out.shape[0] != e - s:
            raise ValueError(f"run_chunk returned {getattr(out, 'shape', type(out))} for frames [{s}, {e})")
        finished.append(blender.push(s, e, out.float().cpu(), nxt))
        written += flush(nxt is None)
        i += 1
        if nxt is None:
            break
        latents.release(nxt)
        state["noise"].release(nxt)
        if progress is not None:
            progress(written, latents.end if state["eof"] else total)
    if progress is not None:
        progress(written, written)
    return StreamResult(written, i)


@dataclass
class StreamReport:
    """What :func:`stylize_video_file` wrote."""

    path: Path
    frames: int
    fps: float
    width: int
    height: int
    chunks: int
    audio: str                        # "none", "copied (aac)", "re-encoded to AAC", ...
    seconds: float
    notices: list[str] = field(default_factory=list)


def output_format(container: str) -> str:
    """The container a stylized copy of a source in ``container`` is written in (same container; mp4 for folders)."""
    return OUTPUT_FORMATS.get(container, "mp4")


def stylize_video_file(reader: VideoReader, output, *, encode: Callable, run_chunk: Callable, decode: Callable,
                       seed: int, chunking: Chunking = Chunking(), vae_batch: int | None = None, audio=True, fmt: str | None = None, quality: int = 23,
                       metadata: dict | None = None, progress: Progress | None = None) -> StreamReport:
    """Stylize an opened video into ``output`` with :func:`stream_stylize`, at the source's frame rate, with audio.

    Args:
        reader: the source, from :func:`~.video.open_video` (its frame selection, resize and rate apply).
        output: the file to write (written to a temporary name and renamed when complete; on any error nothing is
            left behind and an existing ``output`` is untouched).
        encode, run_chunk, decode, seed, chunking, vae_batch, progress: as
            :func:`stream_stylize`.
        audio: True keeps the source's audio (from ``reader.info.start_time``, cut where the video ends; copied or
            re-encoded, see :mod:`.audio`), False drops it, or an :class:`~.audio.AudioTrack` to mux instead.
        fmt: output container (default :func:`output_format` of the source: the same container, mp4 for a folder).
        quality: h264 CRF.
        metadata: container tags (see :class:`~.video.VideoWriter`).

    Returns:
        :class:`StreamReport`; its notices include the reader's (e.g. a variable frame rate resampled, decoder
        errors in a damaged file) and say when the source's audio could not be kept (gif).
    """
    info = reader.info
    fmt = (fmt or output_format(info.container)).lower()
    notices = []
    if audio is True:
        track = AudioFile(info.path, start=info.start_time) if info.has_audio else None
        if track is not None and fmt in ("gif", "webp"):
            notices.append(f"the audio of '{info.path.name}' was not kept: {fmt} files cannot hold audio")
            track = None
    else:
        track = audio or None
    vae_batch = vae_batch or chunking.frames_per_batch
    start = time.perf_counter()
    with VideoWriter(output, info.fps, fmt, quality=quality, audio=track, metadata=metadata) as writer:
        result = stream_stylize(reader.chunks(vae_batch), encode=encode, run_chunk=run_chunk, decode=decode,
                                write=writer.write, seed=seed, chunking=chunking, vae_batch=vae_batch, total=info.frame_estimate, progress=progress)
    h, w = writer.size
    return StreamReport(Path(output), result.frames, info.fps, w, h, result.chunks, writer.audio_description,
                        time.perf_counter() - start, [*reader.notices, *notices])
