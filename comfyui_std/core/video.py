"""Video input/output and chunking for video style transfer (torch + PyAV; no ComfyUI, no diffusers).

* :func:`load_video` decodes a video file (mp4, webm, mov, mkv, gif) as a stream, or reads a folder of frames, and
  returns only what was asked for: with a frame cap it stops decoding early, and memory holds only kept frames.
* :func:`save_video` writes an IMAGE-style batch ``[T, H, W, 3]`` (float 0..1) as mp4 (h264), webm (vp9),
  animated webp or gif.
* :func:`chunk_ranges` / :class:`ChunkBlender` (:func:`blend_chunks`) split a long clip into overlapping chunks and
  cross-fade the overlaps, so peak memory follows the chunk size and no seam shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import STDInputError, check_range

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RESIZE_MODES = ("none", "crop", "pad", "stretch")
SAVE_FORMATS = ("mp4", "webm", "webp", "gif")
#: frame rates the loader reports and the saver writes (one range, so a loaded clip can always be saved again)
FPS_RANGE = (0.01, 1000.0)
#: GIF stores frame delays in hundredths of a second: faster than this cannot be represented
GIF_MAX_FPS = 50.0


@dataclass
class VideoInfo:
    fps: float            # frame rate of the returned frames
    source_fps: float
    frame_count: int      # frames returned
    source_width: int
    source_height: int
    width: int            # size of the returned frames
    height: int
    decoded_frames: int   # frames the decoder produced (<= the file's frame count when capped)

    def as_dict(self) -> dict:
        return asdict(self)


def _snap(size: int, mode: str) -> int:
    if mode == "pad":
        return int(math.ceil(size / 8) * 8)
    if mode == "stretch":
        return max(8, int(round(size / 8) * 8))
    return max(8, (size // 8) * 8)


def resize_frame(frame: np.ndarray, mode: str) -> np.ndarray:
    """Make both sides a multiple of 8: center ``crop``, edge-replicate ``pad``, or ``stretch`` (bilinear)."""
    if mode == "none":
        return frame
    h, w = frame.shape[:2]
    th, tw = _snap(h, mode), _snap(w, mode)
    if (th, tw) == (h, w):
        return frame
    if mode == "crop":
        if h < 8 or w < 8:
            raise STDInputError("resize", f"frames of {w}x{h} are smaller than 8 pixels; use pad or stretch")
        top, left = (h - th) // 2, (w - tw) // 2
        return frame[top:top + th, left:left + tw]
    if mode == "pad":
        return np.pad(frame, ((0, th - h), (0, tw - w), (0, 0)), mode="edge")
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _check_selection(frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize):
    cap = check_range("frame_load_cap", frame_load_cap, 0, 1_000_000, kind=int)
    skip = check_range("skip_first_frames", skip_first_frames, 0, 10_000_000, kind=int)
    nth = check_range("select_every_nth", select_every_nth, 1, 100_000, kind=int)
    rate = check_range("force_rate", force_rate, 0.0, 240.0)
    if resize not in RESIZE_MODES:
        raise STDInputError("resize", f"got {resize!r}, choose one of {', '.join(RESIZE_MODES)}")
    return cap, skip, nth, rate


class _Selector:
    """Applies force_rate, then skip, then every-nth, then the cap, to a stream of (time, frame)."""

    def __init__(self, cap, skip, nth, rate):
        self.cap, self.skip, self.nth, self.rate = cap, skip, nth, rate
        self.next_time = 0.0
        self.index = 0  # index in the rate-converted stream
        self.kept = 0

    @property
    def done(self) -> bool:
        return self.cap > 0 and self.kept >= self.cap

    def offer(self, time_s: float | None) -> int:
        """How many copies of this frame to keep (0, 1, or more when force_rate upsamples)."""
        copies = 1
        if self.rate > 0 and time_s is not None:
            copies = 0
            while time_s + 1e-6 >= self.next_time:
                copies += 1
                self.next_time += 1.0 / self.rate
        keep = 0
        for _ in range(copies):
            i = self.index
            self.index += 1
            if i < self.skip or (i - self.skip) % self.nth:
                continue
            if self.done:
                break
            keep += 1
            self.kept += 1
        return keep


def _stack(frames: list[np.ndarray]) -> torch.Tensor:
    out = torch.empty((len(frames), *frames[0].shape), dtype=torch.float32)
    for i, f in enumerate(frames):
        out[i] = torch.from_numpy(f).float().div_(255.0)
    return out


def load_video(path, frame_load_cap: int = 0, skip_first_frames: int = 0, select_every_nth: int = 1,
               force_rate: float = 0.0, resize: str = "none", folder_fps: float = 8.0):
    """Load frames as a float tensor ``[T, H, W, 3]`` in 0..1 plus a :class:`VideoInfo`.

    Args:
        path: a video file or a folder of image frames (sorted by name).
        frame_load_cap: keep at most this many frames (0 = all); decoding stops once reached.
        skip_first_frames: drop this many frames first (after force_rate).
        select_every_nth: then keep every nth frame.
        force_rate: resample to this frame rate by frame timestamps (0 = keep the source rate).
        resize: ``none``, or make sides a multiple of 8 by ``crop``, ``pad`` or ``stretch``.
        folder_fps: frame rate reported for a folder of frames when force_rate is 0.
    """
    cap, skip, nth, rate = _check_selection(frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize)
    path = Path(path)
    if not path.exists():
        raise STDInputError("video", f"'{path.name}' does not exist")
    if path.is_dir():
        return _load_folder(path, cap, skip, nth, rate, resize, folder_fps)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise STDInputError("video", f"'{path.name}' is not a supported video ({', '.join(VIDEO_EXTENSIONS)})")
    import av

    sel = _Selector(cap, skip, nth, rate)
    frames: list[np.ndarray] = []
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise STDInputError("video", f"'{path.name}' has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 8.0
            sw, sh = stream.codec_context.width, stream.codec_context.height
            for frame in container.decode(stream):
                decoded += 1
                t = float(frame.pts * stream.time_base) if frame.pts is not None and stream.time_base else None
                if t is None:
                    t = (decoded - 1) / src_fps
                n = sel.offer(t)
                if n:
                    img = resize_frame(frame.to_ndarray(format="rgb24"), resize)
                    frames.extend([img] * n)
                if sel.done:
                    break
    except STDInputError:
        raise
    except Exception as err:  # PyAV raises InvalidDataError and friends for corrupt files
        reason = str(err).replace(f"'{path}'", "").replace(str(path), path.name).rstrip(": ")  # no server paths
        raise STDInputError("video", f"could not decode '{path.name}': {type(err).__name__}: {reason}") from None
    return _finish(frames, f"'{path.name}' ({decoded} decoded)", cap, skip, nth, rate, src_fps, sw, sh, decoded)


def _finish(frames, source: str, cap, skip, nth, rate, src_fps, source_width, source_height, decoded):
    """Stack the kept frames and describe them; no frames left is a user error naming the selection."""
    if not frames:
        raise STDInputError("video", f"no frames left from {source} after "
                                     f"skip_first_frames={skip}, select_every_nth={nth}, frame_load_cap={cap}")
    h, w = frames[0].shape[:2]
    fps = (rate or src_fps) / nth
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise STDInputError("select_every_nth", f"every {nth}th frame of {source} at {rate or src_fps:g} fps gives "
                                                f"{fps:g} fps, outside the {FPS_RANGE[0]:g}-{FPS_RANGE[1]:g} fps a "
                                                "video can be saved at; keep fewer frames with frame_load_cap or "
                                                "set force_rate")
    info = VideoInfo(fps, src_fps, len(frames), source_width, source_height, w, h, decoded)
    return _stack(frames), info


def _load_folder(path: Path, cap, skip, nth, rate, resize, folder_fps):
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise STDInputError("video", f"folder '{path.name}' has no image frames ({', '.join(IMAGE_EXTENSIONS)})")
    src_fps = float(folder_fps)
    sel = _Selector(cap, skip, nth, rate)
    frames, first_size = [], None
    for i, f in enumerate(files):
        n = sel.offer(i / src_fps)
        if n:
            try:
                with Image.open(f) as im:
                    arr = np.array(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise STDInputError("video", f"could not read frame '{f.name}': {err}") from None
            if first_size is None:
                first_size = arr.shape[:2]
            elif arr.shape[:2] != first_size:
                raise STDInputError("video", f"frame '{f.name}' is {arr.shape[1]}x{arr.shape[0]} but the first frame "
                                             f"is {first_size[1]}x{first_size[0]}; all frames must share one size")
            arr = resize_frame(arr, resize)
            frames.extend([arr] * n)
        if sel.done:
            break
    width, height = (first_size[1], first_size[0]) if first_size else (0, 0)
    return _finish(frames, f"folder '{path.name}' ({len(files)} images)", cap, skip, nth, rate, src_fps, width,
                   height, len(files))


def save_video(frames: torch.Tensor, path, fps: float, fmt: str | None = None, quality: int = 23) -> Path:
    """Write ``[T, H, W, 3]`` floats in 0..1 as mp4 (h264), webm (vp9), animated webp or gif."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in SAVE_FORMATS:
        raise STDInputError("format", f"got {fmt!r}, choose one of {', '.join(SAVE_FORMATS)}")
    check_range("fps", fps, *FPS_RANGE)
    if fmt == "gif" and fps > GIF_MAX_FPS:
        raise STDInputError("fps", f"got {fps:g}: GIF stores frame delays in hundredths of a second, so it plays at "
                                   f"most {GIF_MAX_FPS:g} fps; use mp4 or webm for faster clips")
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] not in (3, 4) or not len(frames):
        raise STDInputError("images", "expected an IMAGE batch [frames, height, width, 3]")
    arr = (frames[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if fmt in ("webp", "gif"):
        from PIL import Image

        imgs = [Image.fromarray(a) for a in arr]
        kwargs = dict(save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)), loop=0)
        if fmt == "webp":
            kwargs.update(quality=90, lossless=False)
        imgs[0].save(path, format=fmt.upper(), **kwargs)
        return path
    import av

    h, w = arr.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sides
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if fmt == "mp4" else "libvpx-vp9"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(quality)} if fmt == "mp4" else {"crf": "32", "b:v": "0"}
        for a in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def chunk_ranges(num_frames: int, frames_per_batch: int, overlap: int = 0) -> list[tuple[int, int]]:
    """[start, end) ranges covering ``num_frames`` in chunks of ``frames_per_batch`` sharing ``overlap`` frames."""
    num_frames = check_range("frames", num_frames, 1, 10_000_000, kind=int)
    fpb = check_range("frames_per_batch", frames_per_batch, 1, 100_000, kind=int)
    overlap = check_range("overlap", overlap, 0, max(0, fpb - 1), kind=int)
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
