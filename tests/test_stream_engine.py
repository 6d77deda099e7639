"""The app engine's streamed video method (STDEngine.run_video_file) on the tiny offline models.

The streamed output equals STDEngine.run on the same frames (what the Video tab ran in memory), the audio is kept,
progress comes per chunk, the frame limit is stated, and tiled VAE coding takes effect without breaking equality.
"""

import json

import av
import pytest
import torch
from media_files import capture_written_frames, write_clip

from comfyui_std.core import STDInputError
from comfyui_std.core.chunks import Chunking
from comfyui_std.core.frames import resize_frames
from comfyui_std.core.video import load_video
from std_app import tiny
from std_app.engine import StyleSettings
from std_app.media import fit_size
from std_app.startup import load_engine, tiny_options


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tiny.build_tiny_models(tmp_path_factory.mktemp("tiny"), "sd15")
    return load_engine(tiny_options("sd15", root))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=12, fps=12, size=(36, 52))


@pytest.fixture
def captured(monkeypatch):
    """The frames the streamed path hands to its writer (the file itself is lossy h264)."""
    return capture_written_frames(monkeypatch)


def settings(**kw):
    return StyleSettings(**{"prompt": "an oil painting", "nfe": 2, "lora": "std_tiny_v2v_eta0.75", "seed": 5,
                            "cfg": 3.0, **kw})


@pytest.mark.parametrize("noise, gamma, fpb, overlap", [("per_frame", 0.0, 4, 1), ("shared", 0.3, 5, 2),
                                                         ("per_frame", 0.3, 12, 0)])
def test_streamed_video_equals_the_in_memory_run(engine, clip, tmp_path, captured, noise, gamma, fpb, overlap):
    s = settings(gamma=gamma)
    calls = []
    result = engine.run_video_file(clip, tmp_path / "out.mp4", s, size=48, progress=lambda done,
                                   total: calls.append((done, total)), chunking=Chunking(fpb, overlap, noise))
    frames, info = load_video(clip)
    frames = resize_frames(frames, fit_size(info.width, info.height, 48, engine.vae_scale))
    reference = engine.run(frames, s, progress_bar=False, chunking=Chunking(fpb, overlap, noise))
    assert torch.equal(torch.cat(captured), reference.frames)
    assert (result.frames, result.fps, result.width, result.height) == (12, 12, 48, 32)
    assert result.audio == "copied (aac)" and result.chunks == len(calls)
    assert calls[-1] == (12, 12)
    # plain fields, no forwarding to the stream's report: the engine's time covers the stream's
    assert not hasattr(result, "report") and result.seconds >= result.stream_seconds > 0
    assert result.record["lora"] == result.lora.name == "std_tiny_v2v_eta0.75" and result.plan.nfe == 2
    with av.open(str(result.path)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        record = json.loads(c.metadata["comment"])
    assert record["settings"]["seed"] == 5 and record["noise"] == noise and record["plan"]["nfe"] == 2


def test_two_fresh_runs_are_identical(engine, clip, tmp_path, captured):
    for name in ("a.mp4", "b.mp4"):
        engine.run_video_file(clip, tmp_path / name, settings(), chunking=Chunking(4, 0, "per_frame"))
    assert torch.equal(torch.cat(captured[:len(captured) // 2]), torch.cat(captured[len(captured) // 2:]))


def test_frame_limit_is_stated(engine, clip, tmp_path):
    result = engine.run_video_file(clip, tmp_path / "cut.mp4", settings(), size=32, max_frames=5)
    assert result.frames == 5 and any("Only the first 5 frames" in n for n in result.notices)
    full = engine.run_video_file(clip, tmp_path / "full.mp4", settings(), size=32, max_frames=12)
    assert full.frames == 12 and not full.notices


def test_tiled_vae_takes_effect_and_stays_equal(engine, tmp_path, captured):
    """The tiny VAE tiles frames above 64 px: tiled output differs from untiled, and streamed tiled == in-memory
    tiled."""
    src = write_clip(tmp_path / "big.mp4", frames=3, fps=8, size=(96, 96), audio=None)
    engine.run_video_file(src, tmp_path / "tiled.mp4", settings(), tiled_vae=True, chunking=Chunking(3))
    tiled = torch.cat(captured)
    captured.clear()
    engine.run_video_file(src, tmp_path / "plain.mp4", settings(), chunking=Chunking(3))
    assert not torch.equal(tiled, torch.cat(captured))
    assert not engine.pipe.vae.use_tiling  # restored
    frames = load_video(src)[0]
    with engine.vae_tiling(True):
        reference = engine.run(frames, settings(), progress_bar=False, chunking=Chunking(3))
    assert torch.equal(tiled, reference.frames)


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs, match", [
    (dict(frame_load_cap=50, max_frames=10), "frame_load_cap"), (dict(size=2), "size"),
    (dict(chunking=Chunking(None)), "a video file is stylized in chunks")])
def test_bad_video_arguments(engine, clip, tmp_path, kwargs, match):
    with pytest.raises(STDInputError, match=match):
        engine.run_video_file(clip, tmp_path / "x.mp4", settings(), **kwargs)
    assert list(tmp_path.iterdir()) == []
