"""Audio of video files: read a track as a waveform, and carry a track into a written video (PyAV; no ComfyUI).

* :func:`read_audio` decodes the first audio stream of a file to ``AudioTrack(waveform [channels, samples] float32,
  sample_rate)``, optionally only the part from ``start`` for ``duration`` seconds (what a frame selection keeps),
  or returns ``None`` when the file has no audio. ComfyUI's ``AUDIO`` type is the same data with a batch axis:
  ``{"waveform": track.waveform[None], "sample_rate": track.sample_rate}``.
* :class:`AudioFile` names the audio of a source file (from ``start``, until the written video ends) and an
  :class:`AudioTrack` is a waveform in memory; :class:`~.video.VideoWriter` takes either and muxes it while the
  video is written (:func:`open_audio_mux`): the packets are **copied** when the output container can hold the
  source codec and nothing is cut from the front, otherwise the audio is **re-encoded** with the container's codec
  (AAC in mp4/mov/mkv, Opus in webm, MP3 in avi), cut to the sample. Either way the track ends with the video.

Timing: the audio at output time ``τ`` is the source's audio at ``start + τ`` (source times are the streams'
timestamps, the clock the video frames use), so audio and video stay in sync after a frame selection; a track that
starts late gets leading silence when re-encoded.
"""

from __future__ import annotations

from collections.abc import Mapping

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .errors import STDInputError, redact_paths

#: the codec each output container's audio is encoded with when it cannot be copied
AUDIO_CODECS = {"mp4": "aac", "mov": "aac", "mkv": "aac", "webm": "libopus", "avi": "libmp3lame"}
#: source codecs copied without re-encoding, per output container (others are re-encoded)
COPY_CODECS = {
    "mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    "mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le", "pcm_f32le"},
    "mkv": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac", "vorbis", "pcm_s16le", "pcm_s24le", "pcm_f32le"},
    "webm": {"opus", "vorbis"},
    "avi": {"mp3", "ac3", "pcm_s16le"},
}
#: sample rates each encoder takes (others are resampled to 48 kHz)
_ENCODER_RATES = {
    "aac": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000),
    "libopus": (8000, 12000, 16000, 24000, 48000),
    "libmp3lame": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
}
MAX_CHANNELS = 8


class AudioTrack(NamedTuple):
    """A waveform ``[channels, samples]`` (float32, -1..1) and its sample rate."""

    waveform: torch.Tensor
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate


@dataclass(frozen=True)
class AudioFile:
    """The first audio stream of ``path`` from ``start`` seconds on, for ``duration`` seconds (None: as long as the
    written video)."""

    path: Path
    start: float = 0.0
    duration: float | None = None


def check_audio_track(audio, what: str = "audio") -> AudioTrack:
    """An :class:`AudioTrack` from a track, a ``(waveform, sample_rate)`` pair or ComfyUI's AUDIO dict; the
    waveform may carry ComfyUI's batch axis of 1 (``[1, channels, samples]``)."""
    if isinstance(audio, Mapping) and "waveform" in audio:  # ComfyUI's dict, or a lazy Mapping (VideoHelperSuite)
        audio = (audio["waveform"], audio.get("sample_rate"))
    if not isinstance(audio, (tuple, list)) or len(audio) != 2:
        raise STDInputError(what, "expected a waveform [channels, samples] and a sample rate")
    wave, rate = audio
    if not isinstance(wave, torch.Tensor):
        raise STDInputError(what, f"the waveform must be a tensor, got {type(wave).__name__}")
    if wave.ndim == 3 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 2 or not 1 <= wave.shape[0] <= MAX_CHANNELS or wave.shape[1] < 1:
        raise STDInputError(what, f"expected a waveform [channels (1-{MAX_CHANNELS}), samples], got shape "
                                  f"{list(wave.shape)}")
    if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or not 1000 <= int(rate) <= 768000:
        raise STDInputError(what, f"the sample rate must be an integer from 1000 to 768000 Hz, got {rate!r}")
    wave = wave.detach().float().cpu()
    if not torch.isfinite(wave).all():
        raise STDInputError(what, "the waveform contains NaN or infinite samples")
    return AudioTrack(wave.contiguous(), int(rate))


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, "stereo")


def _open_audio(path: Path):
    """(container, audio stream) of a file, or (None, None) when it has no audio stream."""
    import av

    try:
        container = av.open(str(path))
    except Exception as err:  # PyAV raises InvalidDataError and friends for unreadable files
        raise STDInputError("audio", f"could not open '{path.name}': {type(err).__name__}: "
                                     f"{redact_paths(str(err))}") from None
    if not container.streams.audio or container.streams.audio[0].codec_context is None:
        container.close()
        return None, None
    return container, container.streams.audio[0]


def _samples(container, stream, name: str, start: float, layout: str | None) -> Iterator[np.ndarray]:
    """The stream's audio from source time ``start`` on, as contiguous float32 arrays ``[channels, n]`` at the
    stream's sample rate (``layout``: channel layout to convert to; None keeps the source's). A stream starting
    after ``start`` is preceded by silence; gaps inside the stream are not filled."""
    import av

    rate = stream.codec_context.sample_rate
    resampler = None
    position = None  # source sample index (relative to `start`) of the next sample
    try:
        for frame in container.decode(stream):
            if resampler is None:
                resampler = av.AudioResampler(format="fltp", layout=layout or frame.layout.name, rate=rate)
            if position is None:
                t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
                position = int(round((t - start) * rate))
                if position > 0:
                    channels = len(av.AudioLayout(layout or frame.layout.name).channels)
                    yield np.zeros((channels, position), np.float32)
            for out in resampler.resample(frame):
                arr = out.to_ndarray().astype(np.float32, copy=False)
                if position < 0:
                    cut = min(-position, arr.shape[1])
                    arr, position = arr[:, cut:], position + cut
                if arr.shape[1]:
                    yield arr
        if resampler is not None:
            for out in resampler.resample(None):
                arr = out.to_ndarray().astype(np.float32, copy=False)
                if position is not None and position < 0:
                    cut = min(-position, arr.shape[1])
                    arr, position = arr[:, cut:], position + cut
                if arr.shape[1]:
                    yield arr
    except Exception as err:
        raise STDInputError("audio", f"could not decode the audio of '{name}': {type(err).__name__}: "
                                     f"{redact_paths(str(err))}") from None


def read_audio(path, start: float = 0.0, duration: float | None = None) -> AudioTrack | None:
    """The first audio stream of a video or audio file as an :class:`AudioTrack` (None when there is none).

    Args:
        path: the file.
        start: seconds into the source where the track starts (e.g. skipped frames / frame rate).
        duration: seconds to keep (None: to the end).
    """
    path = Path(path)
    if not path.is_file():
        raise STDInputError("audio", f"'{path.name}' is not a file")
    if start < 0 or (duration is not None and duration <= 0):
        raise STDInputError("audio", f"start must be >= 0 and duration > 0, got start={start}, duration={duration}")
    container, stream = _open_audio(path)
    if container is None:
        return None
    with container:
        rate = stream.codec_context.sample_rate
        limit = None if duration is None else int(round(duration * rate))
        parts, total = [], 0
        for arr in _samples(container, stream, path.name, start, None):
            if limit is not None and total + arr.shape[1] >= limit:
                parts.append(arr[:, :limit - total])
                total = limit
                break
            parts.append(arr)
            total += arr.shape[1]
    if not parts or not total:
        return None
    return AudioTrack(torch.from_numpy(np.concatenate(parts, axis=1)), int(rate))


class _AudioCopy:
    """Copies the packets of a source audio stream into the output, up to the video's end."""

    def __init__(self, output, path: Path, container, stream):
        self.container, self.stream, self.name = container, stream, path.name
        self.out = output.add_stream_from_template(stream)
        self.packets = container.demux(stream)
        self.pending = None
        self.description = f"copied ({stream.codec_context.name})"

    def feed(self, output, until: float) -> None:
        try:
            while True:
                if self.pending is None:
                    self.pending = next(self.packets, None)
                    if self.pending is None:
                        return
                    if self.pending.pts is None or self.pending.size == 0:
                        self.pending = None
                        continue
                packet = self.pending
                if float(packet.pts * packet.time_base) >= until:
                    return
                self.pending = None
                packet.stream = self.out
                output.mux(packet)
        except STDInputError:
            raise
        except Exception as err:
            raise STDInputError("audio", f"could not copy the audio of '{self.name}': {type(err).__name__}: "
                                         f"{redact_paths(str(err))}") from None

    def finish(self, output, end: float) -> None:
        self.feed(output, end)
        self.close()

    def close(self) -> None:
        self.container.close()


class _AudioEncode:
    """Encodes audio (a source file's, trimmed to the sample, or a waveform) with the container's codec."""

    def __init__(self, output, fmt: str, source, name: str, channels: int, rate: int, duration):
        import av

        codec = AUDIO_CODECS[fmt]
        self.rate = rate
        out_rate = rate if rate in _ENCODER_RATES[codec] else 48000
        self.layout = _layout(channels)
        self.out = output.add_stream(codec, rate=out_rate, layout=self.layout)
        self.out.bit_rate = 64000 * len(av.AudioLayout(self.layout).channels)
        self.source, self.name = source, name
        self.limit = None if duration is None else int(round(duration * rate))
        self.pending: np.ndarray | None = None
        self.done = 0  # samples handed to the encoder, at the source rate
        label = {"aac": "AAC", "libopus": "Opus", "libmp3lame": "MP3"}[codec]
        self.description = f"re-encoded to {label}" + (f" ({channels} channels downmixed to stereo)"
                                                       if channels > 2 else "")

    def _encode(self, output, arr: np.ndarray | None) -> None:
        import av

        if arr is None:
            packets = self.out.encode(None)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = self.done
            frame.time_base = Fraction(1, self.rate)
            self.done += arr.shape[1]
            packets = self.out.encode(frame)
        for packet in packets:
            output.mux(packet)

    def feed(self, output, until: float) -> None:
        target = int(round(until * self.rate))
        if self.limit is not None:
            target = min(target, self.limit)
        while self.done < target:
            if self.pending is None:
                self.pending = next(self.source, None)
                if self.pending is None:
                    return
            take = min(self.pending.shape[1], target - self.done)
            arr, rest = self.pending[:, :take], self.pending[:, take:]
            self.pending = rest if rest.shape[1] else None
            self._encode(output, arr)

    def finish(self, output, end: float) -> None:
        self.feed(output, end)
        self._encode(output, None)
        self.close()

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def _waveform_chunks(track: AudioTrack, block: int = 16384) -> Iterator[np.ndarray]:
    """The waveform in blocks, in the encoder's layout (more than two channels are downmixed to stereo)."""
    import av

    wave = track.waveform.clamp(-1, 1).numpy()
    channels = wave.shape[0]
    resampler = (av.AudioResampler(format="fltp", layout="stereo", rate=track.sample_rate) if channels > 2 else None)
    for s in range(0, wave.shape[1], block):
        part = np.ascontiguousarray(wave[:, s:s + block])
        if resampler is None:
            yield part
            continue
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=av.AudioLayout(channels).name)
        frame.sample_rate = track.sample_rate
        for out in resampler.resample(frame):
            yield out.to_ndarray().astype(np.float32, copy=False)
    if resampler is not None:
        for out in resampler.resample(None):
            yield out.to_ndarray().astype(np.float32, copy=False)


def _file_chunks(container, stream, name: str, start: float, layout: str) -> Iterator[np.ndarray]:
    try:
        yield from _samples(container, stream, name, start, layout)
    finally:
        container.close()


def open_audio_mux(output, fmt: str, audio):
    """Add the audio stream for ``audio`` (:class:`AudioFile` or :class:`AudioTrack`) to an open PyAV output
    container of format ``fmt``; returns the muxer (``feed(container, until_seconds)``, ``finish(container,
    end_seconds)``, ``close()``, ``description``), or None when an :class:`AudioFile` has no audio stream."""
    if isinstance(audio, AudioFile):
        path = Path(audio.path)
        container, stream = _open_audio(path)
        if container is None:
            return None
        codec = stream.codec_context.name
        if audio.start <= 0 and codec in COPY_CODECS[fmt] and audio.duration is None:
            try:
                return _AudioCopy(output, path, container, stream)
            except Exception:  # a codec the muxer's template copy refuses: re-encode instead
                container.close()
                container, stream = _open_audio(path)
        ctx = stream.codec_context
        channels = len(ctx.layout.channels) if ctx.layout else 2
        layout = _layout(channels)
        source = _file_chunks(container, stream, path.name, max(0.0, audio.start), layout)
        return _AudioEncode(output, fmt, source, path.name, channels, ctx.sample_rate, audio.duration)
    track = check_audio_track(audio)
    channels = track.waveform.shape[0]
    return _AudioEncode(output, fmt, _waveform_chunks(track), "audio", channels, track.sample_rate, None)
