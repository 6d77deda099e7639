"""The streamed video path of the core (comfyui_std.core.stream, .video reader/writer, .audio, StartNoise).

What is proven here: the streamed loop gives exactly the in-memory result (noise, chunks, cross-fades, VAE blocks)
while reading only a bounded number of frames ahead; the per-frame start noise drawn a few frames at a time equals
the one-draw noise; the reader keeps load_video's selection; the writer is atomic and carries the audio (copied
or re-encoded per container, cut where the video ends); bad files give one clear message naming the file.
"""

import math

import av
import numpy as np
import pytest
import torch

from comfyui_std.core.chunks import Chunking
from comfyui_std.core import DiscreteSchedule, KDenoiser, STDInputError, std_plan
from comfyui_std.core.audio import AudioFile, AudioTrack, read_audio
from comfyui_std.core.noise import StartNoise, start_noise
from comfyui_std.core.stylize import std_chunk_runner, stylize_chunks, stylize_latents
from comfyui_std.core.stream import stream_stylize, stylize_video_file
from comfyui_std.core.chunks import chunk_ranges
from comfyui_std.core.video import VideoWriter, load_video, open_video, save_video
from media_files import (dominant_frequency, frame_ids, write_audio_only, write_clip, write_unknown_codec)


# Start noise ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("frame_shape", [(4, 1, 1), (4, 3, 5), (4, 6, 8), (3, 5, 7), (1, 1, 1)])
def test_per_frame_noise_drawn_in_pieces_equals_one_draw(frame_shape, dtype):
    """Every clip length 1..40, asked for in overlapping windows as the stream loop does; totals given late."""
    size = math.prod(frame_shape)
    for total in range(1, 41):
        full = start_noise(torch.zeros((total, *frame_shape), dtype=dtype), 11, "per_frame")
        noise = StartNoise(frame_shape, 11, "per_frame", dtype)
        assert noise.group == 16 // math.gcd(size, 16)
        start, got = 0, {}
        while start < total:
            end = min(start + 5, total)
            known = total if end + 2 * noise.group > total else None  # what the stream loop knows by then
            got.update({i: f for i, f in zip(range(start, end), noise.frames(start, end, known))})
            noise.release(start)
            start += 3
        assert all(torch.equal(got[i], full[i]) for i in range(total)), (total, frame_shape)


def test_naive_frame_by_frame_draws_differ_from_one_draw():
    """Why StartNoise draws in groups: 4 values per frame (< 16) takes another path of the CPU normal sampler, and a
    5-frame draw recomputes its last 16 values - so frame-by-frame noise is not the ComfyUI noise."""
    g = torch.Generator().manual_seed(11)
    naive = torch.cat([torch.randn((1, 4, 1, 1), generator=g) for _ in range(5)])
    assert not torch.equal(naive, start_noise(torch.zeros(5, 4, 1, 1), 11, "per_frame"))


def test_shared_noise_is_one_frame_repeated():
    noise = StartNoise((4, 2, 2), 5, "shared")
    full = start_noise(torch.zeros(9, 4, 2, 2), 5, "shared")
    assert torch.equal(noise.frames(3, 9), full[3:9]) and torch.equal(noise.frames(0, 2), full[:2])


def test_noise_drawn_past_a_clip_that_turns_out_shorter_is_refused():
    noise = StartNoise((4, 1, 1), 1, "per_frame")  # group 4
    noise.frames(0, 8)  # drawn in groups, as for a long clip
    with pytest.raises(RuntimeError, match="drawn ahead"):
        noise.frames(8, 9, total=9)  # 9 frames: the full draw would have ended with one 5-frame draw


# The streamed loop ------------------------------------------------------------------------------------------------
def encode(frames):  # a toy "VAE" with a spatial mixing, frame by frame
    x = frames.permute(0, 3, 1, 2)
    return torch.cat([x, x.roll(1, dims=2) * 0.5], dim=1)[:, :4].contiguous()


def decode(latents):
    return latents[:, :3].permute(0, 2, 3, 1).clamp(0, 1)


def chunk_fn(s, e, latents, noise):
    """Depends on the whole chunk (like a motion module) and on where it starts, so a wrong chunk shows."""
    return latents + 0.5 * noise + 0.1 * latents.mean(0, keepdim=True) + 0.01 * s


def in_memory(frames, noise, fpb, overlap, vae_batch, seed=3):
    latents = torch.cat([encode(frames[i:i + vae_batch]) for i in range(0, len(frames), vae_batch)])
    out = stylize_chunks(latents, seed, lambda s, e, n: chunk_fn(s, e, latents[s:e], n),
                         chunking=Chunking(fpb, overlap, noise))
    return torch.cat([decode(out[i:i + vae_batch]) for i in range(0, len(out), vae_batch)])


def pieces(frames, sizes):
    """The frames as a stream of uneven batches."""
    i, k = 0, 0
    while i < len(frames):
        n = sizes[k % len(sizes)]
        yield frames[i:i + n]
        i, k = i + n, k + 1


@pytest.mark.parametrize("noise", ["shared", "per_frame"])
@pytest.mark.parametrize("n, fpb, overlap, vae_batch", [
    (1, 4, 0, None), (3, 4, 1, None), (12, 4, 1, None), (12, 5, 2, 3), (17, 6, 3, 4), (20, 8, 0, 8),
    (9, 1, 0, 2), (30, 7, 6, 5)])
def test_streamed_equals_in_memory(noise, n, fpb, overlap, vae_batch):
    frames = torch.rand(n, 2, 3, 3, generator=torch.Generator().manual_seed(n))
    seen, written = [], []

    def run(s, e, latents, chunk_noise):
        seen.append((s, e))
        return chunk_fn(s, e, latents, chunk_noise)

    result = stream_stylize(pieces(frames, [2, 5, 1]), encode=encode, run_chunk=run, decode=decode,
                            write=written.append, seed=3,
                            vae_batch=vae_batch, chunking=Chunking(fpb, overlap, noise))
    assert seen == chunk_ranges(n, fpb, overlap) and result.chunks == len(seen) and result.frames == n
    assert torch.equal(torch.cat(written), in_memory(frames, noise, fpb, overlap, vae_batch or fpb))


@pytest.mark.parametrize("gamma, noise", [(0.0, "per_frame"), (0.4, "per_frame"), (0.4, "shared")])
def test_streamed_core_sampler_equals_stylize_latents(gamma, noise):
    """With the real STD sampler (std_chunk_runner), per-step noise included."""
    schedule = DiscreteSchedule()
    denoiser = KDenoiser(lambda x, t: torch.tanh(x.roll(1, dims=1) * 0.7 + t.reshape(-1, 1, 1, 1) / 1000) +
                         0.2 * x.mean(0, keepdim=True), schedule)
    sigmas = std_plan(4, 0.75).sigmas(schedule)
    latents = torch.randn(11, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    ref = stylize_latents(denoiser, latents, sigmas, 9, gamma=gamma,
                          schedule=schedule, disable=True, chunking=Chunking(4, 1, noise))
    run = std_chunk_runner(denoiser, sigmas, 9, gamma=gamma, noise=noise, schedule=schedule, disable=True)
    out = []
    # the latents are the "frames" here: identity VAE through a lookup of the frame index
    frames = torch.arange(11, dtype=torch.float32).view(11, 1, 1, 1).expand(11, 1, 1, 3)
    stream_stylize(pieces(frames, [3]), encode=lambda f: latents[f[:, 0, 0, 0].long()],
                   run_chunk=run, decode=lambda z: z, write=out.append, seed=9, chunking=Chunking(4, 1, noise))
    assert torch.equal(torch.cat(out), ref)


def test_reads_a_bounded_number_of_frames_ahead():
    """The loop samples a chunk once it has the chunk plus a short read-ahead, not after reading the clip."""
    n, fpb, overlap, vae_batch = 200, 8, 2, 4
    read = [0]

    def source():
        for i in range(n):
            read[0] += 1
            yield torch.full((1, 2, 2, 3), i / n)

    ahead = []

    def run(s, e, latents, noise):
        ahead.append(read[0] - e)
        return latents

    stream_stylize(source(), encode=encode, run_chunk=run, decode=decode, write=lambda f: None, seed=0,
                   vae_batch=vae_batch, chunking=Chunking(fpb, overlap, "per_frame"))
    group = StartNoise((4, 2, 2), 0, "per_frame").group
    assert max(ahead) <= max(fpb - overlap, 2 * group) + vae_batch
    assert len(ahead) == len(chunk_ranges(n, fpb, overlap))


def test_progress_per_chunk_reaches_the_total():
    calls = []
    frames = torch.rand(10, 2, 2, 3)
    stream_stylize([frames], encode=encode, run_chunk=chunk_fn, decode=decode, write=lambda f: None, seed=0, total=99,
                   progress=lambda d, t: calls.append((d, t)), chunking=Chunking(4, 1))
    assert calls[-1] == (10, 10) and len(calls) == len(chunk_ranges(10, 4, 1))
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:])) and calls[0][1] == 99


# Reader -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("stream") / "clip.mp4", frames=24, fps=12)


@pytest.mark.parametrize("kwargs", [{}, dict(frame_load_cap=5, skip_first_frames=3, select_every_nth=2),
                                    dict(force_rate=6), dict(resize="pad")])
def test_reader_streams_what_load_video_returns(clip, kwargs):
    frames, info = load_video(clip, **kwargs)
    with open_video(clip, **kwargs) as reader:
        chunks = list(reader.chunks(4))
        assert reader.info.frame_estimate == info.frame_count == reader.frame_count
        assert reader.video_info() == info
    assert all(len(c) <= 4 for c in chunks) and torch.equal(torch.cat(chunks), frames)


def test_reader_info(clip):
    with open_video(clip, skip_first_frames=6, select_every_nth=2) as reader:
        i = reader.info
        assert (i.has_audio, i.audio_codec, i.container, i.source_frames) == (True, "aac", "mp4", 24)
        assert i.start_time == 0.5 and i.fps == 6 and not i.variable_rate and i.notices == ()


def test_reader_of_a_folder_of_frames(tmp_path):
    from PIL import Image

    from media_files import numbered_frame

    for i in range(7):
        Image.fromarray(numbered_frame(i, 16, 24)).save(tmp_path / f"f{i:03d}.png")
    with open_video(tmp_path, select_every_nth=2, folder_fps=10) as reader:
        frames = torch.cat(list(reader.chunks(3)))
        assert reader.info.container == "folder" and not reader.info.has_audio and reader.info.fps == 5
    assert frame_ids(frames) == [0, 2, 4, 6]


# Writer and audio -------------------------------------------------------------------------------------------------
def test_read_audio_and_its_trim(clip):
    track = read_audio(clip)
    assert track.sample_rate == 44100 and track.waveform.shape[0] == 2 and track.waveform.dtype == torch.float32
    assert abs(track.seconds - 2.0) < 0.05
    part = read_audio(clip, start=0.5, duration=1.0)
    assert part.waveform.shape == (2, 44100)
    assert torch.equal(part.waveform, track.waveform[:, 22050:66150])
    assert abs(dominant_frequency(part.waveform[0].numpy(), 44100) - 440) < 3
    assert abs(dominant_frequency(part.waveform[1].numpy(), 44100) - 660) < 3


def test_read_audio_of_a_silent_video(tmp_path):
    assert read_audio(write_clip(tmp_path / "silent.mp4", audio=None)) is None


def _streams(path):
    with av.open(str(path)) as c:
        video = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        audio = c.streams.audio[0] if c.streams.audio else None
        codec = audio.codec_context.name if audio else None
        samples = sum(f.samples for f in c.decode(audio=0)) if audio else 0
        rate = audio.codec_context.sample_rate if audio else None
    return video, codec, samples, rate


@pytest.mark.parametrize("fmt, source, expect", [
    ("mp4", "mp4", ("copied (aac)", "aac")), ("mkv", "mp4", ("copied (aac)", "aac")),
    ("mov", "mp4", ("copied (aac)", "aac")), ("webm", "mp4", ("re-encoded to Opus", "opus")),
    ("avi", "mp4", ("re-encoded to MP3", "mp3float")), ("mp4", "webm", ("copied (opus)", "opus")),
    ("webm", "webm", ("copied (opus)", "opus"))])
def test_writer_carries_the_audio_per_container(tmp_path, clip, fmt, source, expect):
    src = clip if source == "mp4" else write_clip(tmp_path / "src.webm", frames=24)
    frames, info = load_video(src)
    out = tmp_path / f"out.{fmt}"
    with VideoWriter(out, 12, audio=AudioFile(src)) as writer:
        for i in range(0, 24, 5):
            writer.write(frames[i:i + 5])
    assert writer.audio_description == expect[0]
    video, codec, samples, rate = _streams(out)
    assert video == 24 and codec == expect[1]
    assert abs(samples / rate - 2.0) < 0.1  # ends with the video (to the packet / codec frame)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_trimmed_audio_is_re_encoded_in_sync(tmp_path, clip):
    """Skipping the first 0.5 s of video skips the first 0.5 s of audio: the 440 Hz tone still starts at 0."""
    src = write_clip(tmp_path / "chirp.mp4", frames=24, fps=12)
    with VideoWriter(tmp_path / "out.mp4", 12, audio=AudioFile(src, start=0.5)) as writer:
        writer.write(load_video(src, skip_first_frames=6)[0])
    assert writer.audio_description == "re-encoded to AAC"
    track = read_audio(tmp_path / "out.mp4")
    assert abs(track.seconds - 1.5) < 0.05


def test_save_video_with_a_waveform(tmp_path):
    wave = torch.from_numpy(np.stack([np.sin(2 * np.pi * 1000 * np.arange(32000) / 16000)] * 2).astype(np.float32))
    path = save_video(torch.rand(16, 32, 32, 3), tmp_path / "w.mp4", 8, audio=(wave[None] * 0.5, 16000))
    track = read_audio(path)
    assert track.sample_rate == 16000 and abs(track.seconds - 2.0) < 0.1  # the video is 2 s
    assert abs(dominant_frequency(track.waveform[0, 2000:30000].numpy(), 16000) - 1000) < 5
    long_wave = AudioTrack(torch.zeros(1, 16000 * 9), 16000)  # 9 s of audio under a 2 s video: cut
    assert abs(read_audio(save_video(torch.rand(16, 32, 32, 3), tmp_path / "c.webm", 8, audio=long_wave)).seconds
               - 2.0) < 0.1


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"the previous result")
    with pytest.raises(ZeroDivisionError):
        with VideoWriter(out, 8) as writer:
            writer.write(torch.rand(80, 16, 16, 3))  # past x264's look-ahead: packets are in the file
            assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
            1 / 0
    assert out.read_bytes() == b"the previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]
    with VideoWriter(out, 8) as writer:
        writer.write(torch.rand(3, 16, 16, 3))
    assert load_video(out)[1].frame_count == 3 and [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_stylize_video_file_keeps_fps_container_and_audio(tmp_path, clip):
    with open_video(clip, frame_load_cap=10) as reader:
        report = stylize_video_file(reader, tmp_path / "s.mp4", encode=encode, run_chunk=chunk_fn, decode=decode,
                                    seed=0, chunking=Chunking(4, 1))
    assert (report.frames, report.fps, report.audio, report.chunks) == (10, 12, "copied (aac)", 3)
    video, codec, samples, rate = _streams(tmp_path / "s.mp4")
    assert video == 10 and codec == "aac" and abs(samples / rate - 10 / 12) < 0.05


# Bad input --------------------------------------------------------------------------------------------------------
def _bad(tmp_path, kind):
    p = tmp_path / "bad.mp4"
    if kind == "zero-length":
        p.write_bytes(b"")
    elif kind == "corrupt":
        p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    elif kind == "truncated":
        good = write_clip(tmp_path / "good.mp4").read_bytes()
        p.write_bytes(good[:len(good) // 2])
    elif kind == "audio-only":
        write_audio_only(p)
    elif kind == "unknown codec":
        write_unknown_codec(p)
    return p


@pytest.mark.bad_input
@pytest.mark.parametrize("kind, match", [
    ("zero-length", "could not decode 'bad.mp4'"), ("corrupt", "could not decode 'bad.mp4'"),
    ("truncated", "could not decode 'bad.mp4'"), ("audio-only", "'bad.mp4' has no video stream"),
    ("unknown codec", "'bad.mp4': its video codec cannot be decoded")])
def test_bad_video_files_fail_before_any_output(tmp_path, kind, match):
    bad = _bad(tmp_path, kind)
    with pytest.raises(STDInputError, match=match):
        with open_video(bad) as reader:
            stylize_video_file(reader, tmp_path / "out.mp4", encode=encode, run_chunk=chunk_fn, decode=decode, seed=0)
    assert not (tmp_path / "out.mp4").exists() and not any(p.suffix == ".partial" for p in tmp_path.iterdir())


@pytest.mark.bad_input
def test_one_frame_video(tmp_path):
    src = write_clip(tmp_path / "one.mp4", frames=1)
    with open_video(src) as reader:
        report = stylize_video_file(reader, tmp_path / "out.mp4", encode=encode, run_chunk=chunk_fn, decode=decode,
                                    seed=0, chunking=Chunking(16, 4))
    assert report.frames == 1 and _streams(tmp_path / "out.mp4")[:2] == (1, "aac")


@pytest.mark.bad_input
def test_variable_frame_rate_is_resampled_with_a_notice(tmp_path):
    pts = [0, 40, 80, 200, 320, 360, 400, 520, 640, 680, 720, 840]  # 25 fps bursts and 8 fps gaps
    src = write_clip(tmp_path / "vfr.mp4", frames=12, pts_ms=pts)
    with open_video(src) as reader:
        assert reader.info.variable_rate
        report = stylize_video_file(reader, tmp_path / "out.mp4", encode=encode, run_chunk=chunk_fn, decode=decode,
                                    seed=0, chunking=Chunking(4))
    assert any("variable frame rate" in n and "vfr.mp4" in n for n in report.notices)
    frames, info = load_video(tmp_path / "out.mp4")
    # constant rate at the average: the duration (and so the audio sync) is kept
    assert abs(info.frame_count / info.fps - report.frames / report.fps) < 1e-6
    assert abs(report.frames / report.fps - 0.88) < 0.15
    with open_video(write_clip(tmp_path / "cfr.mp4")) as reader:
        assert not reader.info.variable_rate


@pytest.mark.bad_input
@pytest.mark.parametrize("size", [(23, 37), (1, 9)])
def test_odd_frame_sizes_are_written(tmp_path, size):
    path = save_video(torch.rand(3, *size, 3), tmp_path / "odd.mp4", 8)
    frames, info = load_video(path)
    assert info.frame_count == 3 and (info.height, info.width) == (size[0] + size[0] % 2, size[1] + size[1] % 2)


@pytest.mark.bad_input
@pytest.mark.parametrize("where, match", [
    (lambda d: d / "missing" / "out.mp4", "folder .* does not exist"),
    (lambda d: (d / "dir.mp4").mkdir() or d / "dir.mp4", "is a folder"),
    (lambda d: (d / "file").write_text("x") and d / "file" / "out.mp4", "does not exist"),
    (lambda d: d / "out.flv", "format: got 'flv', choose one of mp4, webm, mov, mkv, avi, gif, webp")])
def test_unwritable_output(tmp_path, where, match):
    with pytest.raises(STDInputError, match=match):
        VideoWriter(where(tmp_path), 8)


@pytest.mark.bad_input
def test_a_failure_mid_stream_leaves_nothing(tmp_path, clip):
    out = tmp_path / "out.mp4"

    def failing_decode(latents, calls=[0]):
        calls[0] += 1
        if calls[0] == 2:
            raise STDInputError("vae", "out of memory (simulated)")
        return decode(latents)

    with pytest.raises(STDInputError, match="simulated"):
        with open_video(clip) as reader:
            stylize_video_file(reader, out, encode=encode, run_chunk=chunk_fn, decode=failing_decode, seed=0,
                               chunking=Chunking(4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bad_input
@pytest.mark.parametrize("audio, match", [
    ((torch.zeros(2, 100), 44100.5), "sample rate"), ((torch.zeros(9, 100), 44100), "channels"),
    ((torch.full((1, 100), float("nan")), 8000), "NaN"), ("noise.wav", "waveform")])
def test_bad_audio_for_save_video(tmp_path, audio, match):
    with pytest.raises(STDInputError, match=match):
        save_video(torch.rand(2, 16, 16, 3), tmp_path / "a.mp4", 8, audio=audio)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bad_input
def test_gif_cannot_hold_audio(tmp_path):
    with pytest.raises(STDInputError, match="gif files cannot hold audio"):
        save_video(torch.rand(2, 16, 16, 3), tmp_path / "a.gif", 8, audio=(torch.zeros(1, 800), 8000))
