"""Small synthetic media files for the streaming and batch tests (PyAV; nothing is downloaded).

Frames are numbered: frame ``i`` is a flat gray of level ``4 * i`` with a moving bright square, so identity and
order survive lossy coding (:func:`frame_ids`). Audio is a sine of known frequency per channel.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

VIDEO_CODECS = {"mp4": "libx264", "mov": "libx264", "mkv": "libx264", "avi": "libx264", "webm": "libvpx-vp9"}
AUDIO_CODECS = {"mp4": "aac", "mov": "aac", "mkv": "aac", "avi": "libmp3lame", "webm": "libopus", "m4a": "aac"}
MUXERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "avi": "avi", "m4a": "ipod"}


def numbered_frame(i: int, h: int, w: int) -> np.ndarray:
    frame = np.full((h, w, 3), (4 * i) % 256, np.uint8)
    s = max(2, min(h, w) // 6)
    x = (3 * i) % max(1, w - s)
    frame[:s, x:x + s] = 255
    return frame


def frame_ids(frames: torch.Tensor) -> list[int]:
    """The number of each frame of :func:`numbered_frame` (from its mean gray outside the square)."""
    return [int(round(float(f[-1].mean()) * 255 / 4)) for f in frames]


def sine(seconds: float, rate: int, channels: int = 2, freqs=(440.0, 660.0)) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * freqs[c % len(freqs)] * t) for c in range(channels)]).astype(np.float32)


def write_clip(path: Path, frames: int = 12, fps: float = 12, size=(48, 64), audio: str | None = "default",
               audio_rate: int = 44100, channels: int = 2, pts_ms: list[int] | None = None,
               audio_seconds: float | None = None) -> Path:
    """A clip of numbered frames (``size`` = (height, width)), with a sine audio track unless ``audio`` is None.

    ``audio``: "default" = the container's usual codec, or a PyAV encoder name. ``pts_ms``: frame times in
    milliseconds (a variable frame rate) instead of a constant ``fps``.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    h, w = size
    with av.open(str(path), "w", format=MUXERS[fmt]) as out:
        v = out.add_stream(VIDEO_CODECS[fmt], rate=Fraction(fps).limit_denominator(1001))
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        if pts_ms is not None:
            v.time_base = v.codec_context.time_base = Fraction(1, 1000)
            v.options = {"bf": "0"}  # no B-frames: their reordering needs evenly spaced timestamps
        a = None
        if audio is not None:
            codec = AUDIO_CODECS[fmt] if audio == "default" else audio
            rate = 48000 if codec == "libopus" else audio_rate
            a = out.add_stream(codec, rate=rate, layout={1: "mono", 2: "stereo"}[channels])
            seconds = audio_seconds if audio_seconds is not None else (
                (pts_ms[-1] / 1000 + 1 / fps) if pts_ms else frames / fps)
            wave = sine(seconds, rate, channels)
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(numbered_frame(i, h, w), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], Fraction(1, 1000)
            for p in v.encode(f):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        if a is not None:
            for s in range(0, wave.shape[1], 4096):
                part = np.ascontiguousarray(wave[:, s:s + 4096])
                af = av.AudioFrame.from_ndarray(part, format="fltp", layout=a.layout.name)
                af.sample_rate, af.pts, af.time_base = a.rate, s, Fraction(1, a.rate)
                for p in a.encode(af):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An mp4 holding only an AAC track (an .m4a under a video name)."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as out:
        a = out.add_stream("aac", rate=44100, layout="stereo")
        wave = sine(seconds, 44100)
        af = av.AudioFrame.from_ndarray(wave, format="fltp", layout="stereo")
        af.sample_rate, af.pts, af.time_base = 44100, 0, Fraction(1, 44100)
        for p in a.encode(af):
            out.mux(p)
        for p in a.encode():
            out.mux(p)
    return path


def write_unknown_codec(path: Path) -> Path:
    """A valid mp4 whose video sample entry names a codec FFmpeg does not know (fourcc 'avc1' -> 'zzzz')."""
    write_clip(path, frames=6, audio=None)
    data = bytearray(Path(path).read_bytes())
    i = data.find(b"avc1", data.find(b"stsd"))  # the sample entry (the file-type box names avc1 too)
    assert i > data.find(b"stsd") > 0
    data[i:i + 4] = b"zzzz"
    Path(path).write_bytes(bytes(data))
    return Path(path)


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[int(spectrum.argmax())])


def capture_written_frames(monkeypatch) -> list:
    """The frames the streamed video path hands to its writer from now on (the file itself is lossy h264); the list
    fills as videos are written."""
    import comfyui_std.core.stream as stream
    from comfyui_std.core.video import VideoWriter

    seen = []

    class Capture(VideoWriter):
        def write(self, frames):
            seen.append(frames.clone())
            super().write(frames)

    monkeypatch.setattr(stream, "VideoWriter", Capture)
    return seen


def write_damaged_clip(path: Path, frames: int = 24, size: int = 128) -> Path:
    """An h264 mp4 whose container is intact but 600 bytes in the middle of its ``mdat`` are overwritten (seeded):
    it opens and every frame decodes, but the decoder logs errors and some frames have broken blocks."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("h264", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            img[:, 2 * i:2 * i + 16] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat")
    middle = start + (len(data) - start) // 2
    data[middle:middle + 600] = np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path
