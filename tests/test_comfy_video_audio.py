"""Real-host tests: audio in and out of the STD video nodes, core VIDEO in and out, and STD Stylize Video File (the
streamed file-to-file path) against the in-memory nodes. Skipped unless COMFYUI_PATH points at a ComfyUI checkout."""

import pytest
import torch

from tools import comfy_host
from comfyui_std.core.audio import read_audio
from comfyui_std.core.video import load_video, save_video

API_DIR = comfy_host.REPO / "example_workflows" / "api"
CLIP = "std_content.mp4"  # 24 frames at 12 fps, 2 s of a tone growing louder (tests/conftest.py)


def _load(host, *args, **kwargs):
    with torch.inference_mode():
        return host.M["STDLoadVideo"].execute(*args, **kwargs)


def test_load_video_outputs_the_audio_of_the_kept_span(host, host_files):
    out = _load(host, CLIP, 8, 4, 1, 8.0, "crop")  # at 8 fps: skip 0.5 s, keep 1 s
    frames, count, fps, *_, audio = out.result
    assert (count, fps) == (8, 8.0) and frames.shape[0] == 8
    wave, rate = audio["waveform"], audio["sample_rate"]
    assert wave.ndim == 3 and wave.shape[:2] == (1, 1) and rate == 16000
    assert abs(wave.shape[-1] / rate - 1.0) < 0.03  # cut to the kept frames
    expected = read_audio(host.base / "input" / CLIP, 0.5, 1.0)
    assert torch.equal(wave[0], expected.waveform)  # from the right place: 0.5 s in
    start = _load(host, CLIP, 8, 0, 1, 8.0, "crop").result[5]["waveform"]
    assert float(wave[..., :800].abs().mean()) > 1.5 * float(start[..., :800].abs().mean())  # louder: later
    assert "audio 16000 Hz x1" in out.ui["text"][0]


def test_a_clip_without_audio_gives_no_audio(host, host_files, tmp_path):
    save_video(torch.rand(4, 32, 32, 3), host.base / "input" / "silent.mp4", fps=8)
    out = _load(host, "silent.mp4", 0, 0, 1, 0.0, "crop")
    assert out.result[5] is None and "no audio" in out.ui["text"][0]


def test_save_video_muxes_audio_and_is_a_core_video(host, host_files):
    frames, _, fps, *_, audio = _load(host, CLIP, 8, 0, 1, 8.0, "crop").result
    with torch.inference_mode():
        out = host.M["STDSaveVideo"].execute(frames, fps, "STD/audio_test", "mp4", audio)
    video = out.result[0]
    path = video.get_stream_source()
    track = read_audio(path)
    assert track is not None and abs(track.seconds - 1.0) < 0.05  # 2 s of audio cut where the 1 s video ends
    components = video.get_components()  # ComfyUI's own VIDEO reading
    assert components.images.shape[0] == 8 and float(components.frame_rate) == 8.0
    assert components.audio is not None
    silent = host.M["STDSaveVideo"].execute(frames, fps, "STD/audio_test", "webm").result[0]
    assert read_audio(silent.get_stream_source()) is None


@pytest.mark.bad_input
def test_save_video_refuses_audio_in_a_gif(host, host_files):
    frames, _, fps, *_, audio = _load(host, CLIP, 4, 0, 1, 8.0, "crop").result
    with pytest.raises(ValueError, match="gif files cannot hold audio"):
        host.M["STDSaveVideo"].execute(frames, fps, "STD/gif_audio", "gif", audio)
    assert not list((host.base / "output" / "STD").glob("gif_audio*"))


def test_core_video_in_and_out(host, host_files):
    with torch.inference_mode():
        core = comfy_host.run_node(host.M["LoadVideo"], CLIP)[0]  # core Load Video: a VideoFromFile
        from_core = _load(host, "", 16, 0, 1, 8.0, "crop", source=core).result
        direct = _load(host, CLIP, 16, 0, 1, 8.0, "crop").result
        assert torch.equal(from_core[0], direct[0]) and from_core[1:5] == direct[1:5]
        assert torch.equal(from_core[5]["waveform"], direct[5]["waveform"])
        # an in-memory VIDEO (core Create Video from images + audio) is read through a temporary file
        made = comfy_host.run_node(host.M["CreateVideo"], direct[0][:6], 8.0, direct[5])[0]
        again = _load(host, "", 0, 0, 1, 0.0, "none", source=made).result
        assert again[0].shape == (6, 64, 64, 3) and again[2] == 8.0 and again[5] is not None
    assert not list((host.base / "temp").glob("std_source_*"))  # the temporary copy is gone


def test_video_nodes_read_path_and_source_whatever_the_video_dropdown_holds(host, tiny_ckpt, host_files):
    """A prompt whose ``video`` is '' (what the dropdown holds when input/ has no video) and whose ``path`` names a
    clip in a subfolder of input/, or whose ``source`` is a core VIDEO, validates and runs through ComfyUI's own
    validator and executor (from ComfyUI 0.8 the validator refused '' before the node ran)."""
    import shutil

    sub = host.base / "input" / "clips"
    sub.mkdir(exist_ok=True)
    shutil.copy(host.base / "input" / CLIP, sub / "in_a_folder.mp4")
    load = {"video": "", "frame_load_cap": 5, "skip_first_frames": 0, "select_every_nth": 1, "force_rate": 0.0,
            "resize": "crop"}
    by_path = {"1": {"class_type": "STDLoadVideo", "inputs": {**load, "path": "clips/in_a_folder.mp4"}},
               "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    ex, server = comfy_host.execute(by_path)
    assert ex.success, [d for e, d in server.events if e == "execution_error"]
    assert "5 frames at 12 fps" in ex.history_result["outputs"]["1"]["text"][0]
    prompt = comfy_host.prepare_workflow(API_DIR / "std_video_file.json", tiny_ckpt, host_files)
    node = next(k for k, v in prompt.items() if v["class_type"] == "STDStylizeVideoFile")
    prompt["90"] = {"class_type": "LoadVideo", "inputs": {"file": CLIP}}
    prompt[node]["inputs"].update(video="", path="", source=["90", 0], frame_load_cap=4)
    ex, server = comfy_host.execute(prompt)
    assert ex.success, [d for e, d in server.events if e == "execution_error"]
    assert "4 frames at" in ex.history_result["outputs"][node]["text"][0]
    # an empty dropdown with neither path nor source still gets the pack's own answer when the node runs
    empty = {"1": {"class_type": "STDLoadVideo", "inputs": {**load, "path": ""}},
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    assert "video: choose a file from ComfyUI's input folder" in comfy_host.client_message(empty)


def test_a_trimmed_core_video_gives_exactly_its_frames_and_audio(host, host_files):
    """A core VIDEO trimmed to 0.5 s from 1.0 s of the 2 s, 12 fps clip (ComfyUI's Trim Video / Video Slice, from
    0.14) gives its 6 frames and 0.5 s of audio from 1.0 s on, as ComfyUI's own ``get_components`` reads it; the
    pack read the whole file (24 frames) before. Hosts without trim windows have no trimmed VIDEO: there the whole
    file is the video, and the window helper says so."""
    import inspect

    from comfy_api.latest import InputImpl

    from comfyui_std.nodes.comfy_compat import trim_window

    with torch.inference_mode():
        core = comfy_host.run_node(host.M["LoadVideo"], CLIP)[0]
        if "start_time" not in inspect.signature(InputImpl.VideoFromFile).parameters:
            assert trim_window(core) == (0.0, 0.0)
            assert _load(host, "", 0, 0, 1, 0.0, "none", source=core).result[1] == 24
            return
        trimmed = comfy_host.run_node(host.M["Video Slice"], core, 1.0, 0.5, False)[0]
        assert trim_window(trimmed) == (1.0, 0.5)
        frames, count, fps, *_, audio = _load(host, "", 0, 0, 1, 0.0, "none", source=trimmed).result
        reference = trimmed.get_components()
    assert count == 6 == reference.images.shape[0] and fps == 12.0
    # the same frames: each frame of the clip is one picture at its own brightness (a step of about 0.011 a frame);
    # ComfyUI decodes to float with another chroma filter, so frames are compared by their mean level
    assert (frames.mean((1, 2, 3)) - reference.images.mean((1, 2, 3))).abs().max() < 0.004
    whole = _load(host, CLIP, 0, 0, 1, 0.0, "none").result[0]
    assert torch.equal(frames, whole[12:18])  # 1.0 s to 1.5 s at 12 fps
    expected = read_audio(host.base / "input" / CLIP, 1.0, 0.5)
    assert torch.equal(audio["waveform"][0], expected.waveform)
    assert abs(audio["waveform"].shape[-1] - reference.audio["waveform"].shape[-1]) <= 1024  # one AAC frame
    # the selection counts from the window's start: skip 2, cap 3 -> frames 14..16 of the clip
    picked = _load(host, "", 3, 2, 1, 0.0, "none", source=trimmed).result[0]
    assert torch.equal(picked, whole[14:17])


class _RecordingVAE:
    """A VAE that remembers what it was asked to decode (the stylized latents, chunk by chunk)."""

    def __init__(self, vae):
        self.vae, self.decoded = vae, []

    def encode(self, pixels):
        return self.vae.encode(pixels)

    def decode(self, latents):
        self.decoded.append(latents.detach().float().cpu().clone())
        return self.vae.decode(latents)


def _file_node(host, tiny_models, positive, negative, vae, **kw):
    args = dict(video=CLIP, seed=5, nfe=3, start_strength=0.75, gamma=0.3, cfg=2.0, frames_per_batch=4, overlap=1,
                noise="shared", frame_load_cap=10, skip_first_frames=0, select_every_nth=1, force_rate=0.0,
                resize="crop", tiled_vae=False, keep_audio=True, filename_prefix="STD/file_test", format="source")
    args.update(kw)
    with torch.inference_mode():
        return host.M["STDStylizeVideoFile"].execute(tiny_models[0], positive, negative, vae, **args)


@pytest.mark.parametrize("noise", ["shared", "per_frame"])
def test_stylize_video_file_equals_the_in_memory_nodes(host, tiny_models, host_files, noise):
    """The streamed node samples exactly what VAE Encode -> STD Stylize Video samples for the same frames (4 chunks
    of 4 with overlaps: the last one pulled back), and writes them with the source's frame rate and audio."""
    _, clip, vae = tiny_models
    with torch.inference_mode():
        enc = host.M["CLIPTextEncode"]()
        pos, neg = enc.encode(clip, "a woodcut")[0], enc.encode(clip, "")[0]
    recorder = _RecordingVAE(vae)
    out = _file_node(host, tiny_models, pos, neg, recorder, noise=noise)
    streamed = torch.cat(recorder.decoded)
    frames = _load(host, CLIP, 10, 0, 1, 0.0, "crop").result[0]
    with torch.inference_mode():
        latent = host.M["VAEEncode"]().encode(vae, frames)[0]
        memory = host.M["STDStylizeVideo"].execute(tiny_models[0], pos, neg, latent, 5, 3, 0.75, 0.3, 2.0, 4, 1,
                                                   noise).result[0]["samples"]
    assert streamed.shape == memory.shape == (10, 4, 8, 8)
    assert (streamed - memory).abs().max() <= 1e-4 * memory.abs().max()
    path = out.result[0].get_stream_source()
    written, info = load_video(path)
    assert (info.frame_count, info.fps, info.width, info.height) == (10, 12.0, 64, 64)
    assert read_audio(path) is not None and "audio: copied" in out.ui["text"][0]
    assert "10 frames at 12 fps in 3 chunk(s)" in out.ui["text"][0]
    quiet = _file_node(host, tiny_models, pos, neg, vae, keep_audio=False, format="webm", frame_load_cap=4)
    assert read_audio(quiet.result[0].get_stream_source()) is None
    assert str(quiet.result[0].get_stream_source()).endswith(".webm")


def test_stylize_video_file_leaves_nothing_when_interrupted(host, tiny_ckpt, host_files):
    import comfy.model_management

    calls = []

    def on_step(value, total):
        calls.append(value)
        if len(calls) == 4:  # inside the second chunk
            comfy.model_management.interrupt_current_processing(True)

    prompt = comfy_host.prepare_workflow(API_DIR / "std_video_file.json", tiny_ckpt, host_files)
    prompt["5"]["inputs"].update(seed=777, filename_prefix="STD/interrupted")
    try:
        ex, server = comfy_host.execute(prompt, on_step=on_step)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not ex.success and "execution_interrupted" in [e for e, _ in server.events]
    folder = host.base / "output" / "STD"
    assert not [p for p in folder.glob("*interrupted*")] and not list(folder.glob(".*partial"))


def _bad_file_prompt(host, tiny_ckpt, host_files, **inputs):
    prompt = comfy_host.prepare_workflow(API_DIR / "std_video_file.json", tiny_ckpt, host_files)
    prompt["5"]["inputs"].update(inputs)
    return prompt


@pytest.fixture(scope="module")
def bad_videos(host, host_files):
    import av

    inp = host.base / "input"
    (inp / "zero_length.mp4").write_bytes(b"")
    (inp / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    container = av.open(str(inp / "audio_only.mp4"), mode="w")  # an mp4 with an AAC track and no video
    stream = container.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(torch.zeros(1, 1024).numpy(), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)
    container.close()
    save_video(torch.rand(1, 32, 32, 3), inp / "one_frame.mp4", fps=8)
    return inp


@pytest.mark.bad_input
@pytest.mark.parametrize("inputs, expected", [
    (dict(video="zero_length.mp4"), "could not decode 'zero_length.mp4'"),
    (dict(video="garbage.mp4"), "could not decode 'garbage.mp4'"),
    (dict(video="audio_only.mp4"), "'audio_only.mp4' has no video stream"),
    (dict(video="../secret.mp4"), "video: '../secret.mp4' is not a file in ComfyUI's input folder"),
    (dict(video="nope.mp4"), "video: 'nope.mp4' does not exist"),
    (dict(frames_per_batch=4, overlap=4), "overlap: got 4, allowed range is [0, 3]"),
    (dict(format="avi"), lambda: comfy_host.choice_refusal("format", "avi", ["source", "mp4", "webm"],
                                                           "format: got 'avi', choose one of source, mp4, webm")),
    (dict(filename_prefix="../../elsewhere"), "filename_prefix: '../../elsewhere' must be a name inside the output"),
    (dict(skip_first_frames=500), "no frames left from 'std_content.mp4'"),
], ids=["zero-length", "corrupt", "audio-only", "traversal", "missing", "overlap", "format", "prefix", "no-frames"])
def test_stylize_video_file_bad_input(host, tiny_ckpt, host_files, bad_videos, inputs, expected):
    message = comfy_host.client_message(_bad_file_prompt(host, tiny_ckpt, host_files, **inputs))
    expected = expected() if callable(expected) else expected  # host-dependent: see comfy_host.choice_refusal
    assert expected in message and str(host.base) not in message
    assert not list((host.base / "output" / "STD").glob(".*partial"))


def test_a_one_frame_video_is_stylized(host, tiny_models, host_files, bad_videos):
    _, clip, vae = tiny_models
    with torch.inference_mode():
        enc = host.M["CLIPTextEncode"]()
        pos, neg = enc.encode(clip, "x")[0], enc.encode(clip, "")[0]
    out = _file_node(host, tiny_models, pos, neg, vae, video="one_frame.mp4", frame_load_cap=0)
    _, info = load_video(out.result[0].get_stream_source())
    assert info.frame_count == 1 and (info.width, info.height) == (32, 32)
