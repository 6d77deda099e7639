"""The Gradio app in tiny mode: every tab driven over HTTP with gradio_client, bad inputs, model files, the CLI.

The app is launched in this process on a free port with the tiny offline model zoo (``std_app.tiny``), which the
app loads through the same code as real files. Runs on a CPU in well under a minute.
"""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import gradio_app
from comfyui_std.core import STDInputError, std_plan
from comfyui_std.core.video import load_video, save_video
from std_app import tiny
from std_app.engine import StyleSettings, resolve_start_strength, teacher_plan
from std_app.handlers import StyleApp
from std_app.models import LoraEntry, resolve
from std_app.startup import ModelOptions, load_engine, tiny_options

REPO = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_record(path) -> tuple[Image.Image, dict]:
    im = Image.open(path)
    return im, json.loads(im.text["std"])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tiny.build_tiny_models(tmp_path_factory.mktemp("tiny"), "sd15")
    tiny.write_lora(tiny.make_unet("sdxl"), root / "loras" / f"{WRONG_BASE}.safetensors", 0.75, "i2i", "tiny-sdxl")
    return root


@pytest.fixture(scope="module")
def app(tiny_root, tmp_path_factory):
    return StyleApp(load_engine(tiny_options("sd15", tiny_root)), tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def client(app):
    demo = gradio_app.build_demo(app)
    port = free_port()
    gradio_app.launch(demo, app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


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
    save_video(torch.rand(6, 40, 56, 3), d / "clip.mp4", fps=12)
    import av

    container = av.open(str(d / "zero.avi"), mode="w")  # a valid container whose stream has no frames
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    return {p.stem: handle_file(str(p)) for p in d.iterdir()}


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
    assert "6 frames at 12 fps" in info


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


# Bad inputs: a readable message each, and the server keeps serving ---------------------------------------------------
BAD_INPUTS = [
    pytest.param("stylize_image", dict(content=None), "content image: nothing was uploaded", id="empty-content"),
    pytest.param("stylize_image", dict(content="notes"),
                 "content image: 'notes.png' is not an image that can be read", id="content-not-an-image"),
    pytest.param("stylize_image", dict(style="notes"), "style image: 'notes.png' is not an image that can be read",
                 id="style-not-an-image"),
    pytest.param("stylize_image", dict(nfe=40), "nfe: nfe 40 at start_strength 0.75 needs 54 scheduler steps, more "
                 "than the 50-step grid holds; the most at this start_strength is 37", id="nfe-beyond-the-grid"),
    pytest.param("stylize_image", dict(nfe=45, plan="trained_start"), "nfe: nfe 45 at start_strength 0.75 with the "
                 "trained_start plan needs more grid points", id="nfe-beyond-trained-start"),
    pytest.param("stylize_image", dict(start_strength=1.5), "start_strength: got 1.5, allowed range is (0.0, 1.0]",
                 id="eta-out-of-range"),
    pytest.param("stylize_image", dict(lora=WRONG_BASE),
                 f"lora: '{WRONG_BASE}' does not fit the loaded base model tiny-sd15", id="lora-for-another-base"),
    pytest.param("stylize_image", dict(lora="nope"), "lora: 'nope' is not one of the loaded LoRAs",
                 id="unknown-lora"),
    pytest.param("stylize_image", dict(output_size=4096), "output_size: got 4096, allowed range is [32, 256]",
                 id="output-size-too-large"),
    pytest.param("stylize_video", dict(content="zero"), "video: no frames left from 'zero.avi' (0 decoded)",
                 id="video-with-zero-frames"),
    pytest.param("stylize_video", dict(content="content"), "video: 'content.png' is not a supported video",
                 id="video-not-a-video"),
    pytest.param("compare", dict(teacher_steps=45), "teacher_steps: got 45, allowed range is [1, 34]",
                 id="teacher-steps-beyond-the-grid"),
]


def _call(client, files, endpoint, content="content", style=None, teacher_steps=10, **overrides):
    upload = files[content] if content else None
    style = files[style] if style else None
    if endpoint == "stylize_video":
        return client.predict(upload, style, *settings(**overrides), 4, 0, "shared", 0, 1, api_name="/stylize_video")
    if endpoint == "compare":
        return client.predict(upload, style, *compare_args(teacher_steps, **overrides), api_name="/compare")
    return client.predict(upload, style, *settings(**overrides), api_name="/stylize_image")


@pytest.mark.parametrize("endpoint, overrides, message", BAD_INPUTS)
def test_bad_input_gives_a_readable_error_and_the_server_keeps_serving(client, files, endpoint, overrides, message):
    with pytest.raises(AppError, match=re.escape(message)):
        _call(client, files, endpoint, **overrides)
    image, _, info, _ = _call(client, files, "stylize_image", nfe=1)
    assert Path(image).is_file() and "NFE 1" in info


# UI wiring ----------------------------------------------------------------------------------------------------------
def test_everything_that_runs_the_model_shares_one_queue_worker(app):
    demo = gradio_app.build_demo(app)
    gpu = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("stylize_image", "stylize_video", "compare")}
    assert set(gpu) == {"stylize_image", "stylize_video", "compare"}
    assert all(fn.concurrency_id == gradio_app.GPU and fn.concurrency_limit == 1 for fn in gpu.values())
    assert all(not fn.preprocess for fn in gpu.values())  # uploads are opened by the handlers (readable errors)


def test_server_is_local_unless_asked():
    assert gradio_app.server_options(gradio_app.parse_args([])) == {"server_name": "127.0.0.1",
                                                                    "server_port": 7860, "share": False}
    args = gradio_app.parse_args(["--listen", "--share", "--port", "9000"])
    assert gradio_app.server_options(args) == {"server_name": "0.0.0.0", "server_port": 9000, "share": True}


# Engine and model files (no server) ---------------------------------------------------------------------------------
def test_static_clip_stays_identical_with_shared_noise(app):
    frames = torch.rand(1, 32, 32, 3).repeat(5, 1, 1, 1)
    s = StyleSettings(prompt="x", nfe=2, gamma=0.5, lora="std_tiny_v2v_eta0.75")
    shared = app.engine.run(frames, s, frames_per_batch=3, overlap=1).frames
    # equal up to float rounding (batched CPU kernels are not bit-exact across batch entries)
    assert max((shared[0] - f).abs().max().item() for f in shared[1:]) < 1e-5
    per_frame = app.engine.run(frames, s, frames_per_batch=3, overlap=1, noise="per_frame").frames
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


def test_half_precision_keeps_the_vae_in_float32(tiny_root):
    """The GPU setting (fp16) on a CPU-friendly half type: UNet, text and image encoders in bf16, VAE in float32."""
    options = tiny_options("sd15", tiny_root)
    options.dtype = "bf16"
    engine = load_engine(options)
    assert (engine.pipe.unet.dtype, engine.pipe.vae.dtype) == (torch.bfloat16, torch.float32)
    style = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out = engine.run(torch.rand(2, 32, 32, 3), StyleSettings(nfe=2, gamma=0.3, lora="std_tiny_v2v_eta0.75"), style,
                     frames_per_batch=1).frames
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_teacher_plan_and_eta_resolution():
    t = teacher_plan(std_plan(8, 0.75), 20)
    assert t.start_timestep == 739 and len(t.timesteps) == 20 and all(x % 20 == 19 for x in t.timesteps)
    assert list(t.timesteps) == sorted(set(t.timesteps), reverse=True)
    with pytest.raises(STDInputError, match=r"teacher_steps: got 40, allowed range is \[1, 37\]"):
        teacher_plan(std_plan(8, 0.75), 40)
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


def test_style_files_that_do_not_fit_are_refused(tiny_root, tmp_path):
    options = ModelOptions(base="tiny-sd15", models_dir=tiny_root, device="cpu", dtype="fp32",
                           ip_adapter="ip-adapter_tiny.safetensors")
    with pytest.raises(STDInputError, match="needs both --ip-adapter and --image-encoder"):
        load_engine(options)
    sdxl_adapter = tiny.write_ip_adapter(tiny.make_unet("sdxl"), tmp_path / "ip-adapter_tinyxl.safetensors")
    options.ip_adapter, options.image_encoder = str(sdxl_adapter), "tiny_clip_vision.safetensors"
    with pytest.raises(STDInputError, match="pick the IP-Adapter made for your base model"):
        load_engine(options)


def test_a_style_image_without_an_ip_adapter_is_a_readable_error(tiny_root, tmp_path, files):
    engine = load_engine(ModelOptions(base="tiny-sd15", models_dir=tiny_root, device="cpu", dtype="fp32"))
    assert engine.style is None
    app = StyleApp(engine, tmp_path)
    with pytest.raises(gr.Error, match="no IP-Adapter is loaded"):
        app.stylize_image(files["content"]["path"], files["style"]["path"], *settings())


def test_cli_tiny_serves_all_tabs(tmp_path):
    """``python gradio_app.py --tiny`` as a user runs it: the page and its API come up with its four tabs."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "gradio_app.py", "--tiny", "--port", str(port), "--output-dir",
                             str(tmp_path / "out")], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        config = None
        deadline = time.monotonic() + 180
        while config is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    config = json.load(r)
            except OSError:
                time.sleep(0.5)
        assert config is not None, (tmp_path / "server.log").read_text()[-3000:]
        tabs = [c["props"].get("label") for c in config["components"] if c["type"] in ("tab", "tabitem")]
        assert tabs == ["Image", "Video", "Compare", "One-step"]
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert "start timestep 739" in client.predict("std_tiny_i2i_eta0.75", 0.75, True, 8, "official",
                                                      api_name="/plan")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


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
