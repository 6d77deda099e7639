"""Video input and output for video style transfer (torch + PyAV; no ComfyUI, no diffusers).

* :func:`open_video` opens a video file (mp4, webm, mov, mkv, avi, gif) or a folder of frames as a stream
  (:class:`VideoReader`): frames are decoded as they are read, with a frame cap decoding stops early, and only the
  frames being handed out are in memory. :func:`load_video` reads the selection into one IMAGE-style tensor.
* :class:`VideoWriter` writes frames incrementally as mp4/mov/mkv/avi (h264), webm (vp9), gif or animated webp, with
  an optional audio track (:mod:`.audio`), to a temporary file that is renamed only when complete;
  :func:`save_video` writes an IMAGE-style batch ``[T, H, W, 3]`` (float 0..1) through it.

Cutting a clip into overlapping chunks is :mod:`.chunks`; the streamed stylization is :mod:`.stream`.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .audio import AudioFile, check_audio_track, open_audio_mux
from .errors import STDInputError, check_range, redact_paths
from .folders import folder_files
from .frames import RESIZE_MODES, snap_frame
from .images import IMAGE_EXTENSIONS, image_to_float

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi")
SAVE_FORMATS = ("mp4", "webm", "webp", "gif")
#: frame rates the loader reports and the saver writes (one range, so a loaded clip can always be saved again)
FPS_RANGE = (0.01, 1000.0)
#: GIF stores frame delays in hundredths of a second: faster than this cannot be represented
GIF_MAX_FPS = 50.0
#: what :class:`VideoWriter` writes (streamed: mp4, mov, mkv, webm, avi; assembled at close: gif, webp)
WRITE_FORMATS = ("mp4", "webm", "mov", "mkv", "avi", "gif", "webp")


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


def check_selection(frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize):
    """The frame selection of :func:`open_video` / :func:`load_video`, checked (the one place its ranges live)."""
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


@dataclass
class StreamInfo:
    """What :func:`open_video` knows about a source before its frames are read."""

    path: Path
    fps: float                  # frame rate of the frames handed out
    source_fps: float
    source_width: int
    source_height: int
    width: int                  # size of the frames handed out (after resize)
    height: int
    start_time: float           # seconds into the source of the first kept frame (what audio must skip)
    source_frames: int | None   # frames in the source (counted by the probe; None when not probed)
    frame_estimate: int | None  # frames the selection will hand out (exact for a probed CFR file; else an estimate)
    selectable_frames: int | None  # the same without frame_load_cap (how many a cap cut off)
    variable_rate: bool         # the probe found uneven frame timestamps (then resampled to ``fps``, see notices)
    has_audio: bool
    audio_codec: str | None
    container: str              # the source's extension without the dot ("mp4", "webm", ...) or "folder"
    notices: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return dict(asdict(self), path=str(self.path))


def _estimate(frames: int | None, src_fps: float, cap, skip, nth, rate) -> int | None:
    if frames is None:
        return None
    if rate:
        frames = int(math.ceil(frames * rate / src_fps - 1e-6))
    frames = max(0, frames - skip)
    frames = -(-frames // nth)
    return min(frames, cap) if cap else frames


def _in_window(frames: int | None, fps: float, window: tuple[float, float]) -> int | None:
    """Frames of a constant-rate source of ``frames`` frames that lie in the trim ``window`` (start, duration)."""
    start, duration = window
    if frames is None or (not start and not duration):
        return frames
    first = min(frames, math.ceil(start * fps - 1e-6))
    end = frames if not duration else min(frames, math.ceil((start + duration) * fps - 1e-6))
    return max(0, end - first)


def check_window(window) -> tuple[float, float]:
    """A trim window ``(start, duration)`` in seconds (duration 0: to the end), checked."""
    if window is None:
        return 0.0, 0.0
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise STDInputError("window", f"expected (start, duration) in seconds, got {window!r}")
    start = check_range("window start", window[0], 0.0, 1e7)
    duration = check_range("window duration", window[1], 0.0, 1e7)
    return float(start), float(duration)


def _probe(path: Path):
    """(packet count, variable frame rate?) of the first video stream, from its packets alone (no decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
    deltas = np.diff(np.asarray(pts, dtype=np.int64))
    deltas = deltas[deltas > 0]
    variable = bool(len(deltas) > 1 and deltas.max() - deltas.min() > 2 and deltas.max() > 1.2 * deltas.min())
    return len(pts), variable


def _reason(err: Exception, path: Path) -> str:
    """An FFmpeg/PIL error text without server paths (they quote full paths): the file's own path is dropped, any
    other absolute path is cut to its last part (:func:`~.errors.redact_paths`)."""
    return redact_paths(str(err).replace(f": '{path}'", "").replace(f"'{path}'", f"'{path.name}'"))


class VideoReader:
    """A video file or a folder of frames opened for streaming (made by :func:`open_video`).

    Iterating yields the kept frames one at a time as ``uint8`` arrays ``[H, W, 3]``; :meth:`chunks` yields float
    batches ``[n, H, W, 3]`` in 0..1 (IMAGE layout). Only the frames being handed out are in memory. The first kept
    frame is decoded when the reader is opened, so a file that cannot be decoded, or a selection that keeps no
    frame, fails before any output is created. :attr:`info` describes the source; :attr:`frame_count` and
    :attr:`decoded_frames` count what has been read so far. Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: Path, cap: int, skip: int, nth: int, rate: float, resize: str, folder_fps: float,
                 probe: bool, window: tuple[float, float] = (0.0, 0.0)):
        self.path, self.resize = path, resize
        self._window = window
        self.frame_count = 0
        self.decoded_frames = 0
        self.decode_errors = 0  # errors the decoder reported while frames were read (damaged data)
        self._notices = notices = []
        if path.is_dir():
            self._files = sorted(folder_files(path, IMAGE_EXTENSIONS, "video"))
            if not self._files:
                raise STDInputError("video", f"folder '{path.name}' has no image frames ({', '.join(IMAGE_EXTENSIONS)})")
            src_fps, container, source_frames, variable = float(folder_fps), "folder", len(self._files), False
            has_audio, audio_codec = False, None
            gen = self._folder_frames(src_fps)
        else:
            if path.suffix.lower() not in VIDEO_EXTENSIONS:
                raise STDInputError("video", f"'{path.name}' is not a supported video "
                                             f"({', '.join(VIDEO_EXTENSIONS)})")
            src_fps, has_audio, audio_codec, source_frames, variable = self._open_file(probe)
            source_frames = _in_window(source_frames, src_fps, window)
            container = path.suffix.lower().lstrip(".")
            if variable and not rate:
                rate = src_fps
                notices.append(f"'{path.name}' has a variable frame rate: its frames were resampled by their "
                               f"timestamps to a constant {src_fps:g} fps (its average), so the audio stays in sync")
            gen = self._file_frames(src_fps)
        self._sel = _Selector(cap, skip, nth, rate)
        self._gen = gen
        first = next(self._gen, None)
        if first is None:
            self.close()
            source = (f"folder '{path.name}' ({len(self._files)} images)" if container == "folder" else
                      f"'{path.name}' ({self.decoded_frames} decoded)")
            raise STDInputError("video", f"no frames left from {source} after "
                                         f"skip_first_frames={skip}, select_every_nth={nth}, frame_load_cap={cap}")
        self._first = first
        if container == "folder":
            self._source_size = self._folder_size
        h, w = first.shape[:2]
        base = rate or src_fps
        if not FPS_RANGE[0] <= base / nth <= FPS_RANGE[1]:
            self.close()
            raise STDInputError("select_every_nth", f"every {nth}th frame of '{path.name}' at {base:g} fps gives "
                                                    f"{base / nth:g} fps, outside the {FPS_RANGE[0]:g}-"
                                                    f"{FPS_RANGE[1]:g} fps a video can be saved at; keep fewer frames "
                                                    "with frame_load_cap or set force_rate")
        self.info = StreamInfo(path, base / nth, src_fps, self._source_size[0], self._source_size[1], w, h,
                               window[0] + skip / base, source_frames, _estimate(source_frames, src_fps, cap, skip, nth, rate),
                               _estimate(source_frames, src_fps, 0, skip, nth, rate), variable, has_audio, audio_codec, container, tuple(notices))

    # Sources -----------------------------------------------------------------------------------------------------
    def _open_file(self, probe: bool):
        import av

        name = self.path.name
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise STDInputError("video", f"'{name}' has no video stream")
                stream = container.streams.video[0]
                if stream.codec_context is None:
                    raise STDInputError("video", f"'{name}': its video codec cannot be decoded by this FFmpeg build "
                                                 f"(PyAV {av.__version__}); convert it to h264, e.g. ffmpeg -i "
                                                 f"'{name}' -c:v libx264 -c:a aac out.mp4")
                src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 8.0
                self._source_size = (stream.codec_context.width, stream.codec_context.height)
                audio = container.streams.audio
                audio_codec = audio[0].codec_context.name if audio and audio[0].codec_context else None
                if audio and audio_codec is None:
                    self._notices.append(f"the audio of '{name}' cannot be decoded by this FFmpeg build and is "
                                         f"not kept")
                frames = int(stream.frames) or None
            variable = False
            if probe:
                frames, variable = _probe(self.path)
        except STDInputError:
            raise
        except Exception as err:  # PyAV raises InvalidDataError and friends for corrupt files
            raise STDInputError("video", f"could not decode '{name}': {type(err).__name__}: "
                                         f"{_reason(err, self.path)}") from None
        return src_fps, bool(audio_codec), audio_codec, frames, variable

    def _file_frames(self, src_fps: float):
        import av

        name = self.path.name
        container = None
        try:
            container = av.open(str(self.path))
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # threads inside each frame's decode: its errors are logged during it
            start, duration = self._window
            # A trimmed source keeps the frames whose pts lie in [start, start + duration), as ComfyUI's own
            # VideoFromFile reads its trim window (pts compared in the stream's time base; duration 0: to the end).
            tb = stream.time_base
            start_pts = int(start / tb) if tb else 0
            end_pts = int((start + duration) / tb) if tb and duration else None
            if start_pts > 0:
                container.seek(start_pts, stream=stream)
            for frame in _counting_errors(container.decode(stream), self):
                self.decoded_frames += 1
                if frame.pts is not None and tb:
                    if frame.pts < start_pts:
                        continue
                    if end_pts is not None and frame.pts >= end_pts:
                        return
                t = float(frame.pts * tb) - start if frame.pts is not None and tb else None
                if t is None:
                    t = (self.decoded_frames - 1) / src_fps
                n = self._sel.offer(t)
                if n:
                    img = snap_frame(frame.to_ndarray(format="rgb24"), self.resize)
                    for _ in range(n):
                        yield img
                if self._sel.done:
                    return
        except (STDInputError, GeneratorExit):
            raise
        except Exception as err:  # PyAV raises InvalidDataError and friends for corrupt files
            where = f" after {self.decoded_frames} frames" if self.decoded_frames else ""
            raise STDInputError("video", f"could not decode '{name}'{where}: {type(err).__name__}: "
                                         f"{_reason(err, self.path)}") from None
        finally:
            if container is not None:
                container.close()

    def _folder_frames(self, src_fps: float):
        from PIL import Image, UnidentifiedImageError

        first_size = None
        self._folder_size = (0, 0)
        for i, f in enumerate(self._files):
            self.decoded_frames = i + 1
            n = self._sel.offer(i / src_fps)
            if n:
                try:
                    with Image.open(f) as im:
                        rgb, _, _ = image_to_float(im, f"frame '{f.name}'")
                    arr = (rgb * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
                except (UnidentifiedImageError, OSError, ValueError) as err:
                    if isinstance(err, STDInputError):
                        raise
                    raise STDInputError("video", f"could not read frame '{f.name}': {_reason(err, f)}") from None
                if first_size is None:
                    first_size = arr.shape[:2]
                    self._folder_size = (first_size[1], first_size[0])
                elif arr.shape[:2] != first_size:
                    raise STDInputError("video", f"frame '{f.name}' is {arr.shape[1]}x{arr.shape[0]} but the first "
                                                 f"frame is {first_size[1]}x{first_size[0]}; all frames must share "
                                                 f"one size")
                arr = snap_frame(arr, self.resize)
                for _ in range(n):
                    yield arr
            if self._sel.done:
                return

    # Reading -----------------------------------------------------------------------------------------------------
    def __iter__(self):
        if self._first is not None:
            first, self._first = self._first, None
            self.frame_count += 1
            yield first
        for frame in self._gen:
            if frame.shape[:2] != (self.info.height, self.info.width):
                raise STDInputError("video", f"'{self.path.name}' changes its frame size at frame "
                                             f"{self.frame_count}: {frame.shape[1]}x{frame.shape[0]} after "
                                             f"{self.info.width}x{self.info.height}")
            self.frame_count += 1
            yield frame

    def chunks(self, n: int):
        """The kept frames as float batches ``[<= n, H, W, 3]`` in 0..1 (the last one may be shorter)."""
        n = check_range("chunk", n, 1, 1_000_000, kind=int)
        batch = []
        for frame in self:
            batch.append(frame)
            if len(batch) == n:
                yield _stack(batch)
                batch = []
        if batch:
            yield _stack(batch)

    def read_all(self) -> torch.Tensor:
        """Every kept frame as one float batch ``[T, H, W, 3]`` in 0..1 (converted from uint8 once)."""
        return _stack(list(self))

    @property
    def notices(self) -> tuple[str, ...]:
        """:attr:`StreamInfo.notices` plus what reading found: the decoder's error reports (a damaged file decodes
        to frames with broken blocks, and only the decoder's log says so). Ask after reading."""
        if not self.decode_errors:
            return self.info.notices
        return (*self.info.notices,
                f"'{self.path.name}' is damaged: the decoder reported {self.decode_errors} error(s) in the "
                f"{self.decoded_frames} frames read, so some frames may show broken blocks or smears; re-encode or "
                f"re-download the file if they matter")

    def video_info(self) -> VideoInfo:
        """The :class:`VideoInfo` of the frames read so far (what :func:`load_video` returns)."""
        i = self.info
        return VideoInfo(i.fps, i.source_fps, self.frame_count, i.source_width, i.source_height, i.width, i.height,
                         self.decoded_frames)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DECODE_LOG_LOCK = threading.Lock()


def _counting_errors(frames, reader: VideoReader):
    """``frames`` (a PyAV decode iterator) with the errors libav logs while each frame is decoded added to
    ``reader.decode_errors``. PyAV keeps libav's log off by default; it is switched to errors only for the
    duration of each ``next()``, and captured, so nothing is printed and other decoders are left as they were."""
    import av.logging

    while True:
        with _DECODE_LOG_LOCK:  # the log level and the capture are process-wide: one decode at a time is counted
            previous = av.logging.get_level()
            av.logging.set_level(av.logging.ERROR)
            try:
                with av.logging.Capture(local=False) as logs:
                    frame = next(frames, None)
            finally:
                av.logging.set_level(previous)
        reader.decode_errors += sum(1 for level, _, _ in logs if level <= av.logging.ERROR)
        if frame is None:
            return
        yield frame


def open_video(path, frame_load_cap: int = 0, skip_first_frames: int = 0, select_every_nth: int = 1,
               force_rate: float = 0.0, resize: str = "none", folder_fps: float = 8.0, *,
               probe: bool = True, window: tuple[float, float] | None = None) -> VideoReader:
    """Open a video file or a folder of frames for streaming, with :func:`load_video`'s frame selection.

    Args:
        path, frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize, folder_fps: as
            :func:`load_video` (selection order: force_rate, then skip, then every nth, then the cap).
        probe: count the file's frames from its packets first (no decoding; gives :attr:`StreamInfo.frame_estimate`
            for progress bars) and detect a variable frame rate, which is then resampled by timestamps to the
            average rate unless ``force_rate`` is set (a notice in :attr:`StreamInfo.notices` says so).
        window: ``(start, duration)`` in seconds: read only the frames of a file whose timestamps lie in that span
            (duration 0: to the end), as a trimmed ComfyUI VIDEO is; the selection then counts from its start, and
            :attr:`StreamInfo.start_time` (where the audio starts) includes it. Video files only.

    Raises:
        STDInputError: the path is missing or not a video, the file cannot be decoded or has no video stream, or
            the selection keeps no frame.
    """
    cap, skip, nth, rate = check_selection(frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize)
    window = check_window(window)
    path = Path(path)
    if not path.exists():
        raise STDInputError("video", f"'{path.name}' does not exist")
    if path.is_dir() and window != (0.0, 0.0):
        raise STDInputError("window", f"'{path.name}' is a folder of frames; a trim window applies to video files")
    return VideoReader(path, cap, skip, nth, rate, resize, folder_fps, probe, window)


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
    with open_video(path, frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize, folder_fps,
                    probe=False) as reader:
        return reader.read_all(), reader.video_info()


def frames_to_uint8(frames) -> np.ndarray:
    """IMAGE-style frames ``[T, H, W, 3 or 4]`` (float 0..1 tensor, or uint8 array) as uint8 RGB ``[T, H, W, 3]``."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] >= 3:
        return np.ascontiguousarray(frames[..., :3])
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] not in (3, 4) or not len(frames):
        raise STDInputError("images", "expected an IMAGE batch [frames, height, width, 3]")
    return (frames[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


#: PyAV muxer of each streamed output format
_MUXERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "avi": "avi"}


class VideoWriter:
    """Write a video incrementally, with an optional audio track, atomically.

    Frames go to a hidden temporary file next to ``path`` (``.<name>.<random>.partial``), which is renamed to
    ``path`` by :meth:`close` once complete; :meth:`abort` (called on any error inside a ``with`` block, and by
    :meth:`close` itself when writing fails) deletes it, so no half-written file is ever left at ``path`` or beside
    it. mp4/mov/mkv/avi are h264 (yuv420p; odd sides are padded by one edge pixel), webm is vp9; each frame is
    encoded as it arrives. Animated webp and gif are assembled when closed (their uint8 frames are held until then:
    use them for short clips).

    Args:
        path: the file to write; its folder must exist.
        fps: frame rate.
        fmt: one of :data:`WRITE_FORMATS` (default: the path's extension).
        quality: h264 CRF (lower is better; 23 is x264's default).
        audio: an :class:`~.audio.AudioFile` (a source's audio, copied or re-encoded, see :mod:`.audio`) or an
            :class:`~.audio.AudioTrack` / ``(waveform [C, S], sample_rate)``; cut where the video ends. gif and webp
            cannot hold audio (refused).
        metadata: container tags (e.g. ``{"comment": ...}``) for mp4/mov/mkv/webm/avi.
    """

    def __init__(self, path, fps: float, fmt: str | None = None, *, quality: int = 23, audio=None,
                 metadata: dict | None = None):
        self.path = Path(path)
        self.fmt = (fmt or self.path.suffix.lstrip(".")).lower()
        if self.fmt not in WRITE_FORMATS:
            raise STDInputError("format", f"got {self.fmt!r}, choose one of {', '.join(WRITE_FORMATS)}")
        self.fps = check_range("fps", fps, *FPS_RANGE)
        if self.fmt == "gif" and self.fps > GIF_MAX_FPS:
            raise STDInputError("fps", f"got {self.fps:g}: GIF stores frame delays in hundredths of a second, so it "
                                       f"plays at most {GIF_MAX_FPS:g} fps; use mp4 or webm for faster clips")
        self.quality = check_range("quality", quality, 0, 51, kind=int)
        if audio is not None and self.fmt in ("gif", "webp"):
            raise STDInputError("audio", f"{self.fmt} files cannot hold audio; save as mp4, webm, mov or mkv to keep "
                                         f"it")
        if audio is not None and not isinstance(audio, AudioFile):
            audio = check_audio_track(audio)
        self.audio, self.metadata = audio, dict(metadata or {})
        self.audio_description = "none"
        check_writable(self.path)
        self.partial = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (height, width) of the first frame
        self._container = self._stream = self._audio = None
        self._held: list[np.ndarray] = []  # gif / webp
        self._closed = False

    def _open(self, h: int, w: int) -> None:
        import av

        self._container = av.open(str(self.partial), mode="w", format=_MUXERS[self.fmt])
        codec = "libvpx-vp9" if self.fmt == "webm" else "libx264"
        self._stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
        self._stream.width, self._stream.height = w + w % 2, h + h % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = ({"crf": "32", "b:v": "0"} if self.fmt == "webm" else {"crf": str(self.quality)})
        if self.metadata:
            self._container.metadata.update({str(k): str(v) for k, v in self.metadata.items()})
        if self.audio is not None:
            self._audio = open_audio_mux(self._container, self.fmt, self.audio)
            if self._audio is not None:
                self.audio_description = self._audio.description

    def _fail(self, err: Exception):
        self.abort()
        if isinstance(err, STDInputError):
            return err
        return STDInputError("output", f"could not write '{self.path.name}': {type(err).__name__}: "
                                       f"{_reason(err, self.partial)}")

    def write(self, frames) -> None:
        """Append frames ``[n, H, W, 3]`` (float 0..1 tensor or uint8 array); every frame must have one size."""
        if self._closed:
            raise STDInputError("output", f"'{self.path.name}' is already closed")
        arr = frames_to_uint8(frames)
        h, w = arr.shape[1:3]
        if self.size is None:
            self.size = (h, w)
        elif self.size != (h, w):
            raise self._fail(STDInputError("images", f"frames of {w}x{h} after {self.size[1]}x{self.size[0]}: a "
                                                     f"video has one frame size"))
        if self.fmt in ("gif", "webp"):
            self._held.extend(arr)
            self.frames += len(arr)
            return
        try:
            if self._container is None:
                self._open(h, w)
            if h % 2 or w % 2:  # yuv420p needs even sides
                arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            import av

            for a in arr:
                for packet in self._stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                    self._container.mux(packet)
            self.frames += len(arr)
            if self._audio is not None:
                self._audio.feed(self._container, self.frames / self.fps)
        except Exception as err:
            raise self._fail(err) from None

    def close(self) -> Path:
        """Finish the file and move it to ``path`` (replacing a file there); returns ``path``."""
        if self._closed:
            return self.path
        if not self.frames:
            self.abort()
            raise STDInputError("images", f"no frames were written to '{self.path.name}'")
        try:
            if self.fmt in ("gif", "webp"):
                self._write_animation()
            else:
                for packet in self._stream.encode():
                    self._container.mux(packet)
                if self._audio is not None:
                    self._audio.finish(self._container, self.frames / self.fps)
                self._container.close()
            os.replace(self.partial, self.path)
        except Exception as err:
            raise self._fail(err) from None
        self._closed = True
        return self.path

    def _write_animation(self) -> None:
        from PIL import Image

        imgs = [Image.fromarray(a) for a in self._held]
        kwargs = dict(save_all=True, append_images=imgs[1:], duration=int(round(1000 / self.fps)), loop=0)
        if self.fmt == "webp":
            kwargs.update(quality=90, lossless=False)
        imgs[0].save(self.partial, format=self.fmt.upper(), **kwargs)
        self._held = []

    def abort(self) -> None:
        """Stop and delete the temporary file (nothing is left behind); ``path`` is untouched."""
        self._closed = True
        for close in (getattr(self._audio, "close", None), getattr(self._container, "close", None)):
            try:
                if close is not None:
                    close()
            except Exception:  # the file is deleted next; a broken stream cannot be finished anyway
                pass
        self._container = self._audio = None
        self._held = []
        try:
            self.partial.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def check_writable(path: Path) -> None:
    """Refuse an output path whose folder is missing or read-only, or that is a folder."""
    parent = path.parent
    if path.is_dir():
        raise STDInputError("output", f"'{path.name}' is a folder, not a file name")
    if not parent.is_dir():
        raise STDInputError("output", f"cannot write '{path.name}': its folder '{parent.name}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise STDInputError("output", f"cannot write '{path.name}': its folder '{parent.name}' is not writable")


def save_video(frames: torch.Tensor, path, fps: float, fmt: str | None = None, quality: int = 23,
               audio=None) -> Path:
    """Write ``[T, H, W, 3]`` floats in 0..1 as mp4 (h264), webm (vp9), animated webp or gif, atomically (see
    :class:`VideoWriter`), optionally with an audio track (``(waveform [channels, samples], sample_rate)`` or an
    :class:`~.audio.AudioTrack`; cut where the video ends; mp4 and webm only)."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in SAVE_FORMATS:
        raise STDInputError("format", f"got {fmt!r}, choose one of {', '.join(SAVE_FORMATS)}")
    arr = frames_to_uint8(frames)
    with VideoWriter(path, fps, fmt, quality=quality, audio=audio) as writer:
        writer.write(arr)
    return path
