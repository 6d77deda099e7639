"""The Gradio app in tiny mode: every tab driven over HTTP with gradio_client, bad inputs, pixel formats, sizes,
model files.

The app is launched in this process on a free port with the tiny offline model zoo (``std_app.tiny``), which the
app loads through the same code as real files. Runs on a CPU in about a minute. Hostile paths and the login are in
``test_app_security.py``, the command line in ``test_app_cli.py``, the browser in ``test_gradio_browser.py``.
"""

import json
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors import safe_open

import gradio_app
from app_server import serve
from comfyui_std.core.chunks import Chunking
from comfyui_std.core import STDInputError, std_plan
from comfyui_std.core.video import load_video, save_video
from std_app import tiny
from comfyui_std.core.plan import teacher_plan
from std_app.engine import StyleSettings, resolve_start_strength
from std_app.handlers import StyleApp
from std_app.models import LoraEntry, resolve
from std_app.startup import ModelOptions, load_engine, tiny_options
from std_hf.tiny import make_unet

WRONG_BASE = "std_tinyxl_i2i_eta0.75"  # an STD LoRA for the tiny SDXL, offered to the tiny SD1.5 app
ARGS = dict(prompt="an oil painting", negative_prompt="blurry", lora="std_tiny_i2i_eta0.75", start_strength=0.75,
            snap_eta=True, nfe=4, gamma=0.0, cfg=6.0, seed=1, randomize_seed=False, output_size=64, plan="official",
            style_preset="style", style_weight=1.0, lora_scale=1.0)


def settings(**overrides) -> list:
    values = dict(ARGS, **overrides)
    return [values[k] for k in gradio_app.SETTINGS_ORDER]


def compare_args(teacher_steps, **overrides) -> list:
    s = settings(**overrides)
    return [*s[:6], teacher_steps, *s[6:]]


def png_record(path) -> tuple[Image.Image, dict]:
    im = Image.open(path)
    return im, json.loads(im.text["std"])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tiny.build_tiny_models(tmp_path_factory.mktemp("tiny"), "sd15")
    tiny.write_lora(make_unet("sdxl"), root / "loras" / f"{WRONG_BASE}.safetensors", 0.75, "i2i", "tiny-sdxl")
    return root


@pytest.fixture(scope="module")
def app(tiny_root, tmp_path_factory):
    return StyleApp(load_engine(tiny_options("sd15", tiny_root)), tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def client(app):
    with serve(app) as (base, _):
        yield Client(base, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    content = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)
    Image.fromarray(content).save(d / "content.png")
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(d / "style.png")
    Image.fromarray(rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8)).save(d / "huge.png")
    (d / "notes.png").write_text("this is not an image")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "dot.png")
    Image.fromarray(rng.integers(0, 255, (64, 4097, 3), dtype=np.uint8)).save(d / "strip.png")
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(d / "small.png")
    good = (d / "content.png").read_bytes()
    (d / "truncated.png").write_bytes(good[:len(good) // 2])
    (d / "bomb.png").write_bytes(png_header(12000, 10000))
    (d / "megabomb.png").write_bytes(png_header(20000, 20000))
    tone = torch.sin(torch.arange(8000) * (2 * torch.pi * 440 / 16000))[None]  # 0.5 s at 16 kHz, one channel
    save_video(torch.rand(6, 40, 56, 3), d / "clip.mp4", fps=12, audio=(tone, 16000))
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    import av

    container = av.open(str(d / "zero.avi"), mode="w")  # a valid container whose stream has no frames
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    return {p.stem: handle_file(str(p)) for p in d.iterdir()}


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (8-bit RGB) in its header and has no pixel data: what a decompression
    bomb looks like before decoding."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def stylize(client, files, content="content", style="style", **overrides):
    return client.predict(files[content] if content else None, files[style] if style else None, *settings(**overrides),
                          api_name="/stylize_image")


# Tabs --------------------------------------------------------------------------------------------------------------
def test_image_tab_runs_the_core_plan_and_writes_the_settings_into_the_png(client, files):
    image, download, info, seed = stylize(client, files)
    im, record = png_record(image)
    plan = std_plan(4, 0.75)
    assert im.size == (64, 48) and seed == 1
    assert record["plan"]["timesteps"] == list(plan.timesteps) and record["plan"]["start_timestep"] == 679
    assert record["settings"]["prompt"] == "an oil painting" and record["lora"] == "std_tiny_i2i_eta0.75"
    assert record["style"] == "style x1" and record["base_model"] == "tiny-sd15"
    params = im.text["parameters"]
    assert params.startswith("an oil painting\nNegative prompt: blurry\n")
    assert "Steps: 4" in params and "Seed: 1" in params and "STD start timestep: 679" in params
    assert Path(download).read_bytes() == Path(image).read_bytes()
    assert "start timestep 679" in info and "NFE 4" in info


def test_same_seed_reproduces_and_randomize_draws_a_new_seed(client, files):
    a, b = (np.asarray(Image.open(stylize(client, files, seed=5)[0])) for _ in range(2))
    assert np.array_equal(a, b)
    image, _, _, seed = stylize(client, files, seed=5, randomize_seed=True)
    assert png_record(image)[1]["settings"]["seed"] == seed
    c = np.asarray(Image.open(stylize(client, files, seed=6)[0]))
    assert not np.array_equal(a, c)


def test_plan_preview_shows_nfe_and_start_timestep(client):
    text = client.predict("std_tiny_i2i_eta0.75", 0.75, True, 8, "official", api_name="/plan")
    assert "NFE 8" in text and "start timestep 739" in text
    assert "start timestep 779" in client.predict("std_tiny_i2i_eta0.75", 0.75, True, 8, "trained_start",
                                                  api_name="/plan")
    snapped = client.predict("std_tiny_i2i_eta0.75", 0.6, True, 8, "official", api_name="/plan")
    assert "start timestep 739" in snapped and "snapped to 0.75" in snapped
    bad = client.predict("std_tiny_i2i_eta0.75", 0.75, True, 40, "official", api_name="/plan")
    assert bad.startswith("⚠️ nfe: nfe 40 at start_strength 0.75 needs 54 scheduler steps")


def test_eta_is_snapped_to_the_lora_unless_told_otherwise(client, files):
    image, _, info, _ = stylize(client, files, start_strength=0.6)
    assert png_record(image)[1]["settings"]["start_strength"] == 0.75 and "snapped to 0.75" in info
    image, _, info, _ = stylize(client, files, start_strength=0.6, snap_eta=False)
    record = png_record(image)[1]
    assert record["plan"]["timesteps"] == list(std_plan(4, 0.6).timesteps)
    assert "differs from the η 0.75 this STD LoRA was trained for" in info


def test_video_tab_stylizes_in_chunks_and_keeps_frame_count_and_fps(client, files):
    video, downloads, info, _ = client.predict(files["clip"], files["style"], *settings(lora="std_tiny_v2v_eta0.75",
                                               nfe=2), 4, 1, "shared", 0, 1, api_name="/stylize_video")
    frames, vinfo = load_video(video)
    assert (vinfo.frame_count, vinfo.fps, vinfo.width, vinfo.height) == (6, 12.0, 64, 48)
    sidecar = json.loads(Path(next(p for p in downloads if p.endswith(".json"))).read_text())
    assert sidecar["plan"]["timesteps"] == list(std_plan(2, 0.75).timesteps) and sidecar["fps"] == 12.0
    assert (sidecar["frames_per_batch"], sidecar["overlap"], sidecar["noise"]) == (4, 1, "shared")
    assert "6 frames at 12 fps" in info and "audio: " in info and "audio: none" not in info
    from comfyui_std.core.audio import read_audio

    track = read_audio(video)  # the source's audio is kept (streamed path: chunk by chunk, then muxed)
    assert track is not None and abs(track.waveform.shape[-1] / track.sample_rate - 0.5) < 0.05


def test_compare_tab_runs_teacher_and_std_from_the_same_start(client, files):
    teacher, student, info, _ = client.predict(files["content"], None, *compare_args(10), api_name="/compare")
    t, s = png_record(teacher)[1], png_record(student)[1]
    assert t["plan"]["name"] == "teacher" and len(t["plan"]["timesteps"]) == 10 and t["lora"] is None
    assert t["plan"]["start_timestep"] == s["plan"]["start_timestep"] == 679
    assert s["plan"]["timesteps"] == list(std_plan(4, 0.75).timesteps) and s["lora"] == "std_tiny_i2i_eta0.75"
    assert "wall time" in info and re.search(r"teacher .*\| 10 \| 679 \| [\d.]+ s", info)


def test_a_huge_image_is_downscaled_with_a_notice(client, files):
    image, _, info, _ = stylize(client, files, content="huge")
    assert "above the 512-pixel limit: it was downscaled to 512x358" in info
    assert Image.open(image).size == (64, 48)


def test_small_and_extreme_aspect_inputs_are_announced_with_the_size_used(client, files):
    image, _, info, _ = stylize(client, files, content="small")
    assert Image.open(image).size == (64, 48)
    assert "The content image is 16x12, smaller than the output size 64: it was upscaled 4x to 64x48" in info
    image, _, info, _ = stylize(client, files, content="strip")
    assert Image.open(image).size == (64, 8)
    assert "The content image is 4097x64, above the 512-pixel limit: it was downscaled to 512x8." in info
    assert ("The content image is 4097x64 (64:1); at output size 64 it runs at 64x8 (8:1), so it is squashed: "
            "raise the output size or crop the content image.") in info
    _, _, info, _ = stylize(client, files)  # 64x48 at 64: nothing to announce
    assert "upscaled" not in info and "squashed" not in info and "⚠️" not in info


def _ramp16(h=24, w=32) -> np.ndarray:
    return np.linspace(0, 65535, h * w).reshape(h, w).round().astype(np.uint16)


def _mode_case(kind: str, d: Path) -> tuple[Path, np.ndarray, str | None]:
    """(file, the RGB pixels it must read as, a notice it must produce) for one pixel format."""
    import cv2

    ramp = _ramp16()
    gray8 = np.round(ramp / 257).astype(np.uint8)
    rgb_of = lambda g: np.repeat(g[..., None], 3, -1)  # noqa: E731
    path = d / f"{kind}.{'tif' if kind in ('I;16B', 'I', 'F', 'LAB', 'CMYK') else 'png'}"
    if kind == "I;16":
        Image.fromarray(ramp).save(path)  # a 16-bit grayscale PNG
        assert Image.open(path).mode == "I;16"
        return path, rgb_of(gray8), None
    if kind == "I;16B":
        Image.frombytes("I;16B", (32, 24), ramp.astype(">u2").tobytes()).save(path)
        return path, rgb_of(gray8), None
    if kind == "RGB16":
        rgb16 = np.stack([ramp, ramp[::-1], np.full_like(ramp, 30000)], -1)
        cv2.imwrite(str(path), rgb16[..., ::-1])  # a 48-bit RGB PNG (OpenCV writes BGR)
        return path, np.round(rgb16 / 257).astype(np.uint8), None
    if kind == "I":
        Image.fromarray(ramp.astype(np.int32), "I").save(path)
        return path, rgb_of(gray8), "32-bit integer pixels: values 0..65535 were mapped to 0..255"
    if kind == "F":
        Image.fromarray((ramp / 65535).astype(np.float32), "F").save(path)
        return path, rgb_of(gray8), "32-bit float pixels: values 0..1 were mapped to 0..255"
    alpha = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (24, 1))
    on_white = lambda c: np.round(c * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255))  # noqa: E731
    if kind == "LA":
        Image.fromarray(np.stack([gray8, alpha], -1), "LA").save(path)
        return path, on_white(rgb_of(gray8)).astype(np.uint8), "transparent pixels: they were placed on white"
    if kind == "RGBA":
        color = np.stack([gray8, 255 - gray8, np.full_like(gray8, 40)], -1)
        Image.fromarray(np.dstack([color, alpha]), "RGBA").save(path)
        return path, on_white(color).astype(np.uint8), "transparent pixels: they were placed on white"
    if kind == "P":
        index = (np.arange(24 * 32).reshape(24, 32) % 3).astype(np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette([200, 0, 0, 0, 0, 200, 0, 150, 0] + [0] * 759)
        im.save(path, transparency=2)  # index 2 (green) is transparent
        colors = np.array([[200, 0, 0], [0, 0, 200], [255, 255, 255]], np.uint8)
        return path, colors[index], "transparent pixels: they were placed on white"
    if kind == "CMYK":
        cmyk = np.zeros((24, 32, 4), np.uint8)
        cmyk[:, :16] = (0, 255, 255, 0)    # red
        cmyk[:, 16:] = (0, 0, 0, 128)      # mid gray
        Image.fromarray(cmyk, "CMYK").save(path)
        want = np.zeros((24, 32, 3), np.uint8)
        want[:, :16], want[:, 16:] = (255, 0, 0), (127, 127, 127)
        return path, want, None
    if kind == "LAB":
        lab = np.zeros((24, 32, 3), np.uint8)
        lab[..., 0] = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (24, 1))  # L 0..100
        lab[..., 1:] = 0  # PIL stores a and b as signed bytes: 0 is neutral gray
        Image.fromarray(lab, "LAB").save(path)
        from PIL import ImageCms

        want = np.asarray(ImageCms.profileToProfile(Image.fromarray(lab, "LAB"), ImageCms.createProfile("LAB"),
                                                    ImageCms.createProfile("sRGB"), outputMode="RGB"))
        assert want[0, -1].min() > 240 and want[0, 0].max() < 15  # L 100 is white, L 0 black
        return path, want, None
    if kind == "1":
        bits = (np.arange(24 * 32).reshape(24, 32) % 2).astype(bool)
        Image.fromarray(bits).save(path)
        return path, rgb_of(bits.astype(np.uint8) * 255), None
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["I;16", "I;16B", "RGB16", "I", "F", "LA", "RGBA", "P", "CMYK", "LAB", "1"])
def test_every_pixel_format_is_converted_by_its_meaning(kind, tmp_path):
    """A 16-bit PNG used to come out 99.6 % white (PIL clips I;16 to 255); now every mode maps to 8-bit sRGB by
    its range, transparency goes on white, and what is not self-evident is announced."""
    from std_app.media import read_image

    path, want, notice = _mode_case(kind, tmp_path)
    image, notices, size = read_image(path, "content image", 512)
    got = np.asarray(image)
    assert image.mode == "RGB" and size == (32, 24) and got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2, (kind, got.mean(), want.mean())
    if notice:
        assert any(notice in n for n in notices), notices
    else:
        assert notices == []


# Bad inputs: a readable message each, and the server keeps serving ---------------------------------------------------
ONESTEP = "lora: 'sid_lsg_tiny_onestep' is a SiD-LSG one-step text-to-image generator, not an STD style-transfer LoRA"
BAD_INPUTS = [
    pytest.param("stylize_image", dict(content=None), "content image: nothing was uploaded", id="empty-content"),
    pytest.param("stylize_image", dict(content="notes"),
                 "content image: 'notes.png' is not an image that can be read", id="content-not-an-image"),
    pytest.param("stylize_image", dict(content="truncated"),
                 "content image: 'truncated.png' is not an image that can be read", id="content-truncated-png"),
    pytest.param("stylize_image", dict(content="bomb"), "content image: 'bomb.png' is 12000x10000 (120 megapixels), "
                 "too large to decode; the limit is 100 megapixels", id="content-decompression-bomb"),
    pytest.param("stylize_image", dict(content="megabomb"), "content image: 'megabomb.png' is too large to decode "
                 "safely (Image size (400000000 pixels) exceeds limit", id="content-bomb-pil-refuses"),
    pytest.param("stylize_image", dict(content="dot"), "content image: 'dot.png' is 1x1, too small to stylize: both "
                 "sides need at least 8 pixels", id="content-1x1"),
    pytest.param("stylize_image", dict(style="notes"), "style image: 'notes.png' is not an image that can be read",
                 id="style-not-an-image"),
    pytest.param("stylize_image", dict(style="dot"), "style image: 'dot.png' is 1x1, too small to stylize",
                 id="style-1x1"),
    pytest.param("stylize_image", dict(nfe=40), "nfe: nfe 40 at start_strength 0.75 needs 54 scheduler steps, more "
                 "than the 50-step grid holds; the most at this start_strength is 37", id="nfe-beyond-the-grid"),
    pytest.param("stylize_image", dict(nfe=45, plan="trained_start"), "nfe: nfe 45 at start_strength 0.75 with the "
                 "trained_start plan needs more grid points", id="nfe-beyond-trained-start"),
    pytest.param("stylize_image", dict(nfe=0), "nfe: got 0, allowed range is [1, 50]", id="nfe-zero"),
    pytest.param("stylize_image", dict(start_strength=1.5), "start_strength: got 1.5, allowed range is (0.0, 1.0]",
                 id="eta-out-of-range"),
    pytest.param("stylize_image", dict(lora=WRONG_BASE),
                 f"lora: '{WRONG_BASE}' does not fit the loaded base model tiny-sd15", id="lora-for-another-base"),
    pytest.param("stylize_image", dict(lora="nope"), "lora: 'nope' is not one of the loaded LoRAs",
                 id="unknown-lora"),
    pytest.param("stylize_image", dict(lora="sid_lsg_tiny_onestep"), ONESTEP, id="one-step-lora-on-image"),
    pytest.param("stylize_image", dict(output_size=4096), "output_size: got 4096, allowed range is [32, 256]",
                 id="output-size-too-large"),
    pytest.param("stylize_image", dict(output_size="big"), "output_size: expected an integer, got 'big' (str)",
                 id="output-size-not-a-number"),
    pytest.param("stylize_image", dict(cfg=31), "cfg: got 31.0, allowed range is [0.0, 30.0]", id="cfg-too-large"),
    pytest.param("stylize_image", dict(gamma=1.5), "gamma: got 1.5, allowed range is [0.0, 1.0]", id="gamma-above-1"),
    pytest.param("stylize_image", dict(seed=-1), "seed: got -1, allowed range is [0, ", id="seed-negative"),
    pytest.param("stylize_image", dict(seed="abc"), "seed: expected an integer, got 'abc' (str)", id="seed-text"),
    pytest.param("stylize_image", dict(plan="fastest"), "plan: got 'fastest', choose one of official, trained_start",
                 id="unknown-plan"),
    pytest.param("stylize_image", dict(style_preset="nope"), "style_preset: got 'nope', choose one of style, layout",
                 id="unknown-style-preset"),
    pytest.param("stylize_image", dict(style_weight=3), "style_weight: got 3.0, allowed range is [0.0, 2.0]",
                 id="style-weight-too-large"),
    pytest.param("stylize_image", dict(lora_scale=-1), "lora_scale: got -1.0, allowed range is [0.0, 2.0]",
                 id="lora-scale-negative"),
    pytest.param("stylize_video", dict(content=None), "video: nothing was uploaded", id="video-empty"),
    pytest.param("stylize_video", dict(content="zero"), "video: no frames left from 'zero.avi' (0 decoded)",
                 id="video-with-zero-frames"),
    pytest.param("stylize_video", dict(content="content"), "video: 'content.png' is not a supported video",
                 id="video-not-a-video"),
    pytest.param("stylize_video", dict(content="corrupt"), "video: could not decode 'corrupt.mp4'",
                 id="video-corrupt-mp4"),
    pytest.param("stylize_video", dict(lora="sid_lsg_tiny_onestep"), ONESTEP, id="one-step-lora-on-video"),
    pytest.param("stylize_video", dict(video=dict(fpb=0)), "frames_per_batch: got 0, allowed range is [1, 4096]",
                 id="video-frames-per-batch-zero"),
    pytest.param("stylize_video", dict(video=dict(fpb=4, overlap=4)), "overlap: got 4, allowed range is [0, 3]",
                 id="video-overlap-not-below-batch"),
    pytest.param("stylize_video", dict(video=dict(cap=10_000)), "frame_load_cap: got 10000, allowed range is [0, 1800]",
                 id="video-cap-above-the-app-limit"),
    pytest.param("stylize_video", dict(video=dict(noise="random")), "noise: got 'random', choose one of shared, "
                 "per_frame", id="video-unknown-noise"),
    pytest.param("stylize_video", dict(video=dict(nth=0)), "select_every_nth: got 0, allowed range is [1, 100000]",
                 id="video-every-0th-frame"),
    pytest.param("compare", dict(teacher_steps=45), "teacher_steps: got 45, allowed range is [1, 34]",
                 id="teacher-steps-beyond-the-grid"),
    pytest.param("compare", dict(teacher_steps=0), "teacher_steps: got 0, allowed range is [1, 34]",
                 id="teacher-steps-zero"),
    pytest.param("compare", dict(content=None), "content image: nothing was uploaded", id="compare-empty-content"),
    pytest.param("compare", dict(lora="sid_lsg_tiny_onestep"), ONESTEP, id="one-step-lora-on-compare"),
]
VIDEO_DEFAULTS = dict(fpb=4, overlap=0, noise="shared", cap=0, nth=1)


def _call(client, files, endpoint, content="content", style=None, teacher_steps=10, video=None, **overrides):
    upload = files[content] if content else None
    style = files[style] if style else None
    if endpoint == "stylize_video":
        v = dict(VIDEO_DEFAULTS, **(video or {}))
        if content == "content" and video is not None or "lora" in overrides:
            upload = files["clip"]
        overrides.setdefault("lora", "std_tiny_v2v_eta0.75")
        return client.predict(upload, style, *settings(**overrides), v["fpb"], v["overlap"], v["noise"], v["cap"],
                              v["nth"], api_name="/stylize_video")
    if endpoint == "compare":
        return client.predict(upload, style, *compare_args(teacher_steps, **overrides), api_name="/compare")
    return client.predict(upload, style, *settings(**overrides), api_name="/stylize_image")


@pytest.mark.bad_input
@pytest.mark.parametrize("endpoint, overrides, message", BAD_INPUTS)
def test_bad_input_gives_a_readable_error_and_the_server_keeps_serving(client, files, endpoint, overrides, message):
    with pytest.raises(AppError, match=re.escape(message)):
        _call(client, files, endpoint, **overrides)
    image, _, info, _ = _call(client, files, "stylize_image", nfe=1)
    assert Path(image).is_file() and "NFE 1" in info


ONE_STEP_BAD = [
    pytest.param(dict(prompt=" "), "prompt: a one-step generator makes an image from the prompt", id="empty-prompt"),
    pytest.param(dict(lora="std_tiny_i2i_eta0.75"), "lora: choose a SiD-LSG one-step LoRA", id="std-lora"),
    pytest.param(dict(lora="nope"), "lora: 'nope' is not one of the loaded LoRAs", id="unknown-lora"),
    pytest.param(dict(batch=99), "batch_size: got 99, allowed range is [1, 16]", id="batch-too-large"),
    pytest.param(dict(width=4096), "width: got 4096, allowed range is [32, 256]", id="width-too-large"),
    pytest.param(dict(height=0), "height: got 0, allowed range is [32, 256]", id="height-zero"),
    pytest.param(dict(seed="x"), "seed: expected an integer, got 'x' (str)", id="seed-text"),
    pytest.param(dict(randomize="no"), "randomize_seed: expected true or false, got 'no'", id="randomize-text"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", ONE_STEP_BAD)
def test_one_step_bad_input(client, overrides, message):
    args = dict(prompt="x", lora="sid_lsg_tiny_onestep", seed=1, randomize=False, width=64, height=64, batch=1)
    args.update(overrides)
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(*args.values(), api_name="/one_step")


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    pytest.param(("std_tiny_i2i_eta0.75", 0.75, True, 8, "fastest"), "⚠️ plan: got 'fastest'", id="unknown-plan"),
    pytest.param(("nope", 0.75, True, 8, "official"), "⚠️ lora: 'nope' is not one of the loaded LoRAs",
                 id="unknown-lora"),
    pytest.param(("std_tiny_i2i_eta0.75", "x", True, 8, "official"), "⚠️ start_strength: expected a number",
                 id="eta-text")])
def test_plan_preview_answers_bad_settings_in_its_text(client, args, message):
    assert client.predict(*args, api_name="/plan").startswith(message)


# UI wiring ----------------------------------------------------------------------------------------------------------
def test_everything_that_runs_the_model_shares_one_queue_worker(app):
    demo = gradio_app.build_demo(app)
    names = ("stylize_image", "stylize_video", "compare", "one_step")
    gpu = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in names}
    assert set(gpu) == set(names)
    assert all(fn.concurrency_id == gradio_app.GPU and fn.concurrency_limit == 1 for fn in gpu.values())
    assert all(not fn.preprocess for fn in gpu.values())  # uploads are opened by the handlers (readable errors)
    # the API a client can call is exactly these and the plan preview; upload checks and the like stay private
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {*names, "plan"}


def test_server_is_local_unless_asked(tmp_path):
    args = gradio_app.parse_args([])
    assert gradio_app.server_options(args) == {"server_name": "127.0.0.1", "server_port": 7860, "share": False}
    assert gradio_app.exposure_warning(args) is None
    args = gradio_app.parse_args(["--listen", "--share", "--port", "9000"])
    assert gradio_app.server_options(args) == {"server_name": "0.0.0.0", "server_port": 9000, "share": True}
    warning = gradio_app.exposure_warning(args)
    assert warning.startswith("warning: serving on every network interface (--listen) and a public gradio.live "
                              "link (--share) with no login") and "--auth USER:PASS or --auth-file FILE" in warning
    (tmp_path / "users.txt").write_text("# team\ncarol:c:o:l:o:n\n\n  dave:pw  \n", encoding="utf-8")
    args = gradio_app.parse_args(["--share", "--auth", "alice:a1", "--auth", "bob:b:2", "--auth-file",
                                  str(tmp_path / "users.txt")])
    assert gradio_app.server_options(args)["auth"] == [("alice", "a1"), ("bob", "b:2"), ("carol", "c:o:l:o:n"),
                                                       ("dave", "pw")]
    assert gradio_app.exposure_warning(args) is None


def test_banner_names_what_is_loaded(app):
    text = gradio_app.banner(app)
    assert "i2i η 0.65/0.75/0.85/0.95" in text and "v2v η 0.65/0.75/0.85/0.95" in text
    assert "**One-step (SiD-LSG)** sid_lsg_tiny_onestep (t_init 625)" in text
    assert "?" not in text and "onestep η" not in text


# Engine and model files (no server) ---------------------------------------------------------------------------------
def test_static_clip_stays_identical_with_shared_noise(app):
    frames = torch.rand(1, 32, 32, 3).repeat(5, 1, 1, 1)
    s = StyleSettings(prompt="x", nfe=2, gamma=0.5, lora="std_tiny_v2v_eta0.75")
    shared = app.engine.run(frames, s, chunking=Chunking(3, 1)).frames
    # equal up to float rounding (batched CPU kernels are not bit-exact across batch entries)
    assert max((shared[0] - f).abs().max().item() for f in shared[1:]) < 1e-5
    per_frame = app.engine.run(frames, s, chunking=Chunking(3, 1, "per_frame")).frames
    assert (per_frame[0] - per_frame[1]).abs().max().item() > 1e-3


def test_tiny_sdxl_runs_with_the_sdxl_style_block_and_lora(tmp_path):
    engine = load_engine(tiny_options("sdxl", tmp_path))
    assert engine.arch == "sdxl" and engine.style
    frames = torch.rand(1, 64, 64, 3)
    style = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    base = StyleSettings(prompt="a cat", nfe=2, cfg=3.0, lora="std_tiny_i2i_eta0.75")
    styled = engine.run(frames, base, style).frames
    scales = {n for n, p in engine.pipe.unet.attn_processors.items() if hasattr(p, "scale") and p.scale[0]}
    assert scales == {"up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"}  # the SDXL style block
    plain = engine.run(frames, base).frames
    no_lora = engine.run(frames, StyleSettings(prompt="a cat", nfe=2, cfg=3.0)).frames
    assert styled.shape == (1, 64, 64, 3)
    assert not torch.equal(styled, plain) and not torch.equal(plain, no_lora)


def test_half_precision_never_runs_the_vae_in_fp16(tiny_root):
    """--dtype fp16 (the GPU default) keeps the VAE in fp32 (SD and SDXL VAEs overflow in fp16, diffusers'
    force_upcast); --dtype bf16 runs it in bf16, as diffusers does. The bf16 engine runs on the CPU."""
    from std_app.models import load_pipeline
    from std_hf.files import resolve

    options = tiny_options("sd15", tiny_root)
    ref = resolve("base", options.base, options.models_dir)
    half = load_pipeline(ref, torch.float16, models_dir=options.models_dir)
    assert (half.unet.dtype, half.vae.dtype) == (torch.float16, torch.float32)
    options.dtype = "bf16"
    engine = load_engine(options)
    assert (engine.pipe.unet.dtype, engine.pipe.vae.dtype) == (torch.bfloat16, torch.bfloat16)
    style = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out = engine.run(torch.rand(2, 32, 32, 3), StyleSettings(nfe=2, gamma=0.3, lora="std_tiny_v2v_eta0.75"), style,
                     chunking=Chunking(1)).frames
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_the_compare_tab_and_the_trainer_previews_run_one_teacher_plan(app):
    """The app's Compare tab (the engine's teacher run) and the trainer's preview grids visit the same teacher
    timesteps from the same start: both come from core.plan.teacher_plan. (They used to differ in 10 of 20 levels
    for 20 steps from grid index 38: floor spacing in the app, rounded linspace in the trainer.)"""
    from types import SimpleNamespace

    from training.std.method import STDMethod

    settings = StyleSettings(nfe=4, start_strength=0.75, plan="trained_start", cfg=1.0)
    teacher = app.engine.run(torch.rand(1, 32, 32, 3), settings, teacher_steps=20, progress_bar=False).plan
    trainer = STDMethod.preview_plan(SimpleNamespace(cfg=SimpleNamespace(start_strength=0.75,
                                                                         preview_teacher_nfe=20)), None)
    assert teacher.start_timestep == trainer.start_timestep == 779  # grid index 38
    assert teacher.timesteps == trainer.timesteps == teacher_plan(779, 20).timesteps
    student = STDMethod.preview_plan(SimpleNamespace(cfg=SimpleNamespace(start_strength=0.75)), 4)
    assert student.timesteps == std_plan(4, 0.75, "trained_start").timesteps


def test_teacher_plan_and_eta_resolution():
    t = teacher_plan(std_plan(8, 0.75).start_timestep, 20)
    assert t.start_timestep == 739 and len(t.timesteps) == 20 and all(x % 20 == 19 for x in t.timesteps)
    assert list(t.timesteps) == sorted(set(t.timesteps), reverse=True)
    with pytest.raises(STDInputError, match=r"teacher_steps: got 40, allowed range is \[1, 37\]"):
        teacher_plan(std_plan(8, 0.75).start_timestep, 40)
    entry = LoraEntry("std_x_eta0.75", Path("std_x_eta0.75.safetensors"), 0.75, "i2i")
    assert resolve_start_strength(None, 0.6, True) == (0.6, None)
    assert resolve_start_strength(entry, 0.75, True) == (0.75, None)
    eta, notice = resolve_start_strength(entry, 0.6, True)
    assert eta == 0.75 and "snapped to 0.75" in notice
    eta, notice = resolve_start_strength(entry, 0.6, False)
    assert eta == 0.6 and "differs from the η 0.75" in notice


@pytest.mark.parametrize("kind, name, folder", [("base", "sd_xl_base_1.0.safetensors", "checkpoints"),
                                                ("lora", "std_sdxl_i2i_eta0.75.safetensors", "loras"),
                                                ("ip_adapter", "ip-adapter_sdxl_vit-h.safetensors", "ipadapter"),
                                                ("image_encoder", "CLIP-ViT-H-14.safetensors", "clip_vision")])
def test_a_missing_file_names_itself_and_the_folder_to_put_it_in(tmp_path, kind, name, folder):
    with pytest.raises(STDInputError) as err:
        resolve(kind, name, tmp_path)
    assert f"'{name}' was not found" in str(err.value) and f"Put it into {tmp_path / folder}" in str(err.value)


def test_hub_references_are_recognised_without_downloading(tmp_path):
    assert resolve("base", "stabilityai/stable-diffusion-xl-base-1.0", tmp_path).repo_id == \
        "stabilityai/stable-diffusion-xl-base-1.0"
    ref = resolve("lora", "hf:SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.75.safetensors")
    assert (ref.repo_id, ref.filename) == ("SecondComming/Single-Trajectory-Distillation",
                                           "std_sdxl_i2i_eta0.75.safetensors")
    with pytest.raises(STDInputError, match="hf:owner/name/path/to/file"):
        resolve("lora", "hf:owner/name")


def test_startup_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert gradio_app.main(["--models-dir", str(tmp_path), "--base", "missing.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "error: base model: 'missing.safetensors' was not found" in err and "Traceback" not in err
    assert gradio_app.main(["--models-dir", str(tmp_path)]) == 2
    assert "no base model given: pass --base" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert gradio_app.main(["--models-dir", str(tmp_path), "--base", "broken"]) == 2
    assert "'broken.safetensors' is not a readable .safetensors file" in capsys.readouterr().err


@pytest.mark.bad_input
def test_a_lora_corrupted_after_start_is_a_message_and_a_foreign_one_names_its_base(app, tiny_root, tmp_path):
    import shutil

    from std_app.models import lora_entry

    engine = app.engine
    path = tmp_path / "std_tiny_i2i_eta0.75_copy.safetensors"
    shutil.copy(tiny_root / "loras" / "std_tiny_i2i_eta0.75.safetensors", path)
    entry = lora_entry(path)  # read at start, while the file was fine
    path.write_bytes(path.read_bytes()[:200])  # then cut short
    engine.catalog.entries[entry.name] = entry
    try:
        with pytest.raises(STDInputError, match=rf"^lora: '{path.name}' is not a readable .safetensors file"):
            engine.run(torch.rand(1, 32, 32, 3), StyleSettings(lora=entry.name, nfe=1))
        with pytest.raises(STDInputError, match=rf"^lora: '{WRONG_BASE}' does not fit the loaded base model "
                                                r"tiny-sd15: \d+ of \d+ layers do not match \(e.g. .*\)\. It was made for "
                                                "tiny-sdxl; use a LoRA made for your base model$"):
            engine.run(torch.rand(1, 32, 32, 3), StyleSettings(lora=WRONG_BASE, nfe=1))
    finally:
        del engine.catalog.entries[entry.name]
    assert entry.adapter_name not in engine._loaded


def test_a_v2v_lora_without_a_motion_module_runs_its_image_layers_and_says_so(app, tiny_root, tmp_path, caplog):
    """Without --motion-module a v2v LoRA's motion layers have no place: the warning names them and the option that
    runs them (the image layers alone give the result)."""
    import logging

    from safetensors.torch import load_file, save_file

    from std_app.models import lora_entry

    engine = app.engine
    v2v = tiny_root / "loras" / "std_tiny_v2v_eta0.75.safetensors"
    sd = load_file(str(v2v))
    motion = [k for k in sd if "motion_modules" in k]
    assert len(motion) == 192  # the tiny zoo's v2v LoRAs carry motion layers, as the released ones do
    image_only = tmp_path / "std_tiny_v2v_eta0.75_image_part.safetensors"
    with safe_open(str(v2v), "pt") as f:
        save_file({k: v for k, v in sd.items() if k not in motion}, str(image_only), metadata=f.metadata())
    entry = lora_entry(image_only)
    engine.catalog.entries[entry.name] = entry
    frames, run = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1)), dict(nfe=2, seed=3)
    try:
        expected = engine.run(frames, StyleSettings(lora=entry.name, **run)).frames
    finally:
        del engine.catalog.entries[entry.name]
    adapter = engine.catalog.get("std_tiny_v2v_eta0.75").adapter_name
    engine.use_lora(None, 1.0)
    if engine._loaded.pop(adapter, None) is not None:  # loaded by an earlier test: load it afresh to see the warning
        engine.pipe.delete_adapters([adapter])
    with caplog.at_level(logging.WARNING, logger="std_app"):
        got = engine.run(frames, StyleSettings(lora="std_tiny_v2v_eta0.75", **run)).frames
    assert "its 192 motion-module tensors are not applied" in caplog.text and "--motion-module" in caplog.text
    assert torch.equal(got, expected)


def test_style_files_that_do_not_fit_are_refused(tiny_root, tmp_path):
    options = ModelOptions(base="tiny-sd15", models_dir=tiny_root, device="cpu", dtype="fp32",
                           ip_adapter="ip-adapter_tiny.safetensors")
    with pytest.raises(STDInputError, match="needs both --ip-adapter and --image-encoder"):
        load_engine(options)
    sdxl_adapter = tiny.write_ip_adapter(make_unet("sdxl"), tmp_path / "ip-adapter_tinyxl.safetensors")
    options.ip_adapter, options.image_encoder = str(sdxl_adapter), "tiny_clip_vision.safetensors"
    with pytest.raises(STDInputError, match="pick the IP-Adapter made for your base model"):
        load_engine(options)


def test_a_style_image_without_an_ip_adapter_is_a_readable_error(tiny_root, tmp_path, files):
    engine = load_engine(ModelOptions(base="tiny-sd15", models_dir=tiny_root, device="cpu", dtype="fp32"))
    assert engine.style is None
    app = StyleApp(engine, tmp_path, local_files=True)
    with pytest.raises(gr.Error, match="no IP-Adapter is loaded"):
        app.stylize_image(files["content"]["path"], files["style"]["path"], *settings())


def test_one_step_tab_generates_with_the_sid_lora_and_refuses_bad_input(client, app):
    gallery, downloads, info, seed = client.predict("a lighthouse", "sid_lsg_tiny_onestep", 5, False, 64, 48, 2,
                                                    api_name="/one_step")
    assert len(gallery) == 2 and seed == 5 and "one step from t_init 625" in info
    first = gallery[0]["image"] if isinstance(gallery[0], dict) else gallery[0]
    path = first["path"] if isinstance(first, dict) else first
    image = Image.open(path)
    assert image.size == (64, 48)
    record = json.loads(image.text["std"])
    assert record["method"] == "sid_lsg" and record["t_init"] == 625
    again = client.predict("a lighthouse", "sid_lsg_tiny_onestep", 5, False, 64, 48, 2, api_name="/one_step")
    a = np.asarray(Image.open(path))
    b_first = again[0][0]["image"] if isinstance(again[0][0], dict) else again[0][0]
    b = np.asarray(Image.open(b_first["path"] if isinstance(b_first, dict) else b_first))
    assert np.array_equal(a, b)  # same seed, same images
    assert "sid_lsg_tiny_onestep" not in app.engine.catalog.choices("i2i")
    for args, message in (((" ", "sid_lsg_tiny_onestep", 1, False, 64, 64, 1), "prompt"),
                          (("x", "std_tiny_i2i_eta0.75", 1, False, 64, 64, 1), "one-step LoRA"),
                          (("x", "sid_lsg_tiny_onestep", 1, False, 64, 64, 99), "batch_size")):
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/one_step")
    assert client.predict("x", "sid_lsg_tiny_onestep", 1, False, 64, 64, 1, api_name="/one_step")[2]



@pytest.mark.bad_input
def test_yes_no_inputs_take_only_true_or_false(app):
    """Bug caught: snap_eta = "no" counted as true (any non-empty string is truthy)."""
    base = dict(prompt="p", negative_prompt="", lora="std_tiny_i2i_eta0.75", start_strength=0.6, nfe=2, gamma=0.0,
                cfg=1.0, seed=1, plan="official", style_preset="style", style_weight=1.0, lora_scale=1.0)
    for name, value in (("snap_eta", "no"), ("randomize_seed", "false"), ("snap_eta", 1)):
        kw = dict(base, snap_eta=False, randomize_seed=False)
        kw[name] = value
        with pytest.raises(STDInputError, match=f"{name}: expected true or false, got {value!r}"):
            app.settings(**kw)


def test_a_one_step_size_off_the_grid_is_stated(client):
    """Bug caught: width 65 gave a 64-px image without a word."""
    gallery, _, info, _ = client.predict("a lighthouse", "sid_lsg_tiny_onestep", 5, False, 65, 48, 1,
                                         api_name="/one_step")
    assert "width 65 is not a multiple of 8: 64 used" in info
