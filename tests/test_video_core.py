"""Video loader/saver and chunk blending (PyAV, no ComfyUI)."""

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.chunks import blend_chunks, chunk_ranges
from comfyui_std.core.video import load_video, save_video

N = 60


def numbered_frames(n=N, h=48, w=64):
    """Frame i is a flat gray of level 4*i, so frame identity survives lossy coding."""
    return torch.stack([torch.full((h, w, 3), (4 * i) / 255.0) for i in range(n)])


def frame_ids(frames):
    return [int(round(float(f.mean()) * 255 / 4)) for f in frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    save_video(numbered_frames(), path, fps=12)
    return path


def test_full_read_roundtrip(clip):
    frames, info = load_video(clip)
    assert frames.shape == (N, 48, 64, 3) and frames.dtype == torch.float32
    assert info.frame_count == N and abs(info.fps - 12) < 1e-6 and info.decoded_frames == N
    assert frame_ids(frames) == list(range(N))


def test_cap_skip_nth_without_full_decode(clip):
    frames, info = load_video(clip, frame_load_cap=5, skip_first_frames=10, select_every_nth=3)
    assert frame_ids(frames) == [10, 13, 16, 19, 22]
    assert info.decoded_frames == 23 < N  # stopped once the cap was reached
    assert abs(info.fps - 4) < 1e-6


def test_force_rate_and_resize(clip):
    frames, info = load_video(clip, force_rate=6, frame_load_cap=4)
    assert frame_ids(frames) == [0, 2, 4, 6] and info.fps == 6
    crop, _ = load_video(clip, frame_load_cap=1, resize="crop")
    assert crop.shape[1:3] == (48, 64)
    odd = torch.rand(2, 50, 70, 3)
    p = clip.parent / "odd.mp4"
    save_video(odd, p, fps=8)
    for mode, size in (("crop", (48, 64)), ("pad", (56, 72)), ("stretch", (48, 72))):
        f, info = load_video(p, resize=mode)
        assert f.shape[1:3] == size, mode
        assert (info.width, info.height) == (size[1], size[0])


@pytest.mark.parametrize("fmt", ["mp4", "webm", "webp", "gif"])
def test_save_formats_read_back(tmp_path, fmt):
    path = save_video(numbered_frames(12, 32, 32), tmp_path / f"out.{fmt}", fps=8)
    if fmt in ("mp4", "webm", "gif"):
        frames, info = load_video(path)
        tol = 0.5 if fmt == "gif" else 0.01  # gif stores delays in 1/100 s
        assert info.frame_count == 12 and abs(info.fps - 8) < tol
    else:
        with Image.open(path) as im:
            assert im.n_frames == 12


def test_folder_of_frames(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((16, 24, 3), 4 * i, np.uint8)).save(tmp_path / f"f{i:03d}.png")
    frames, info = load_video(tmp_path, select_every_nth=2)
    assert frame_ids(frames) == [0, 2, 4] and info.fps == 4
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "f999.png")
    with pytest.raises(STDInputError, match="all frames must share one size"):
        load_video(tmp_path)


@pytest.mark.parametrize("setup, match", [
    (lambda d: d / "missing.mp4", "does not exist"),
    (lambda d: (d / "bad.mp4").write_bytes(b"\x00\x01garbage" * 50) and d / "bad.mp4", "could not decode 'bad.mp4'"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "not a supported video"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no image frames"),
])
def test_bad_video_inputs(tmp_path, setup, match):
    with pytest.raises(STDInputError, match=match):
        load_video(setup(tmp_path))


def test_zero_frames_after_skip(clip):
    with pytest.raises(STDInputError, match="no frames left"):
        load_video(clip, skip_first_frames=1000)
    with pytest.raises(STDInputError, match="select_every_nth"):
        load_video(clip, select_every_nth=0)


def test_chunks_cover_and_blend():
    assert chunk_ranges(64, 8) == [(i, i + 8) for i in range(0, 64, 8)]
    r = chunk_ranges(20, 8, overlap=2)
    assert r[0] == (0, 8) and r[-1][1] == 20 and all(b[0] < a[1] for a, b in zip(r, r[1:]))
    x = torch.arange(20, dtype=torch.float32).view(20, 1)
    assert torch.allclose(blend_chunks(20, r, [x[s:e] for s, e in r]), x)  # consistent chunks blend to themselves
    with pytest.raises(ValueError, match="cannot share"):  # a caller bug: users' values come through a Chunking
        chunk_ranges(20, 8, overlap=8)


@pytest.mark.bad_input
@pytest.mark.parametrize("args, match", [((8, 8), "overlap: got 8, allowed range is \\[0, 7\\]"),
                                         ((0,), "frames_per_batch"), ((4097,), "frames_per_batch"),
                                         ((None, 1), "overlap"), ((4, 1, "random"), "noise: got 'random'"),
                                         (("8",), "frames_per_batch")])
def test_chunking_is_checked_once_where_it_is_made(args, match):
    """A Chunking is the one place frames_per_batch (1..MAX_FRAMES_PER_BATCH), overlap and noise are checked."""
    from comfyui_std.core.chunks import MAX_FRAMES_PER_BATCH, Chunking

    with pytest.raises(STDInputError, match=match):
        Chunking(*args)
    c = Chunking(MAX_FRAMES_PER_BATCH, MAX_FRAMES_PER_BATCH - 1, "per_frame")
    assert c.ranges(5) == [(0, 5)] and c.batch(5) == 5 and Chunking(None).batch(7) == 7
    assert Chunking(8, 2).ranges(20) == chunk_ranges(20, 8, 2)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["nth-too-slow", "gif-too-fast", "fps-too-low", "corrupt-no-server-path"])
def test_loader_and_saver_agree_on_the_fps_range(clip, tmp_path, case):
    """Whatever fps the loader reports, the saver can write (so a loaded clip can always be saved again); what
    cannot be represented is refused with a message, never written wrongly."""
    from comfyui_std.core.video import FPS_RANGE

    if case == "nth-too-slow":  # 12 fps, every 2000th frame -> 0.006 fps: refused at load time, naming the option
        with pytest.raises(STDInputError, match="select_every_nth: every 2000th frame .* gives 0.006 fps"):
            load_video(clip, select_every_nth=2000)
        _, info = load_video(clip, select_every_nth=1000)  # 0.012 fps is inside the range: it saves and reads back
        assert FPS_RANGE[0] <= info.fps <= FPS_RANGE[1]
        out = save_video(numbered_frames(2), tmp_path / "slow.mp4", info.fps)
        assert abs(load_video(out)[1].fps - info.fps) < 1e-6
    elif case == "gif-too-fast":
        with pytest.raises(STDInputError, match="GIF stores frame delays in hundredths of a second"):
            save_video(numbered_frames(2), tmp_path / "fast.gif", 60.0)
        assert not (tmp_path / "fast.gif").exists()
    elif case == "fps-too-low":
        with pytest.raises(STDInputError, match=r"fps: got 0.001, allowed range is \[0.01, 1000.0\]"):
            save_video(numbered_frames(2), tmp_path / "x.mp4", 0.001)
    else:
        bad = tmp_path / "broken.mp4"
        bad.write_bytes(b"junk" * 50)
        with pytest.raises(STDInputError) as err:
            load_video(bad)
        assert "could not decode 'broken.mp4'" in str(err.value) and str(tmp_path) not in str(err.value)


def test_audio_tracks_come_as_comfyui_dicts_or_lazy_mappings(tmp_path):
    """ComfyUI's AUDIO is a dict; VideoHelperSuite hands out a lazy Mapping that decodes on first access. Both mux."""
    from collections.abc import Mapping

    from comfyui_std.core.audio import check_audio_track, read_audio

    wave = torch.sin(torch.arange(8000) / 10.0)[None, None]  # [1, 1, S]: ComfyUI's batch axis

    class Lazy(Mapping):
        def __init__(self):
            self.data = {"waveform": wave, "sample_rate": 8000}

        def __getitem__(self, key):
            return self.data[key]

        def __iter__(self):
            return iter(self.data)

        def __len__(self):
            return len(self.data)

    for audio in ({"waveform": wave, "sample_rate": 8000}, Lazy()):
        track = check_audio_track(audio)
        assert track.sample_rate == 8000 and torch.equal(track.waveform, wave[0])
        out = save_video(numbered_frames(8), tmp_path / "a.mp4", 8.0, audio=audio)
        assert abs(read_audio(out).seconds - 1.0) < 0.05


def test_a_folder_of_16_bit_frames_keeps_its_levels(tmp_path):
    """Frames folders convert images like still images do: a 16-bit PNG at half level is grey, not white."""
    for i in range(3):
        Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / f"f{i}.png")
    frames, info = load_video(tmp_path)
    assert info.frame_count == 3 and abs(float(frames.mean()) - 0.5) < 0.01


def test_a_trim_window_keeps_the_frames_whose_timestamps_lie_in_it(clip, tmp_path):
    """``window=(start, duration)`` reads what a trimmed ComfyUI VIDEO holds: the frames in [start, start + duration)
    (seeking there first), the selection counted from its start, and the audio start moved with it. A reader that
    ignored the window would hand out frame 0 on."""
    from comfyui_std.core.video import open_video

    with open_video(clip, window=(2.0, 0.5)) as reader:  # 12 fps: frames 24..29
        frames = reader.read_all()
        assert frame_ids(frames) == list(range(24, 30))
        assert reader.info.start_time == 2.0 and reader.info.frame_estimate == 6
    with open_video(clip, 2, 1, 2, window=(1.0, 0.0)) as reader:  # to the end; skip 1, every 2nd, cap 2
        assert frame_ids(reader.read_all()) == [13, 15]
        assert abs(reader.info.start_time - (1.0 + 1 / 12)) < 1e-9
    with pytest.raises(STDInputError, match="window start"):
        open_video(clip, window=(-1.0, 1.0))
    with pytest.raises(STDInputError, match="no frames left"):
        open_video(clip, window=(30.0, 1.0))  # past the end of a 5 s clip
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "0.png")
    with pytest.raises(STDInputError, match="a trim window applies to video files"):
        open_video(folder, window=(1.0, 0.0))
