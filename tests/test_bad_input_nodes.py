"""Bad input at every STD node, sent through ComfyUI's real validator and executor as an API client would send it.

Each case mutates a small working prompt and asserts the message the client gets back (ComfyUI's validation error
for out-of-range widgets, the node's own message otherwise), and that the server keeps running. Paths are hostile on
purpose: traversal, absolute names, symlinks out of the input folder, missing files outside it (which must be refused
with the same message as existing ones, so nothing about the server's files leaks)."""

import asyncio
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tools import comfy_host

@pytest.fixture(scope="module")
def files(host, host_files, tiny_models):
    """Hostile and broken files next to the good ones."""
    inp, models = host.base / "input", host.base / "models"
    (inp / "broken.mp4").write_bytes(b"not a video" * 20)
    (inp / "empty_frames").mkdir(exist_ok=True)
    (inp / "mixed_frames").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16)).save(inp / "mixed_frames" / "a.png")
    Image.new("RGB", (24, 16)).save(inp / "mixed_frames" / "b.png")
    (inp / "linked_out").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16)).save(inp / "linked_out" / "a.png")
    (host.base / "private.png").write_bytes((inp / "linked_out" / "a.png").read_bytes())
    if not (inp / "linked_out" / "b.png").is_symlink():
        (inp / "linked_out" / "b.png").symlink_to(host.base / "private.png")
    outside = host.base / "secret"
    outside.mkdir(exist_ok=True)
    (outside / "private.mp4").write_bytes((inp / "std_content.mp4").read_bytes())
    link = inp / "link_out.mp4"
    if not link.exists():
        link.symlink_to(outside / "private.mp4")
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)},
              str(models / "loras" / "text_only.safetensors"))
    save_file({"unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2.to_q.lora_A.weight": torch.zeros(4, 1280),
               "unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2.to_q.lora_B.weight": torch.zeros(1280, 4)},
              str(models / "loras" / "sdxl_only.safetensors"))
    (models / "loras" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{q}.lora_down.weight": torch.full((4, 32), float("nan")), f"{q}.lora_up.weight": torch.zeros(32, 4)},
              str(models / "loras" / "nan.safetensors"))
    save_file({f"{q}.lora_down.weight": torch.zeros(4, 32, dtype=torch.int8),
               f"{q}.lora_up.weight": torch.zeros(32, 4, dtype=torch.int8)}, str(models / "loras" / "int8.safetensors"))
    save_file({f"{q}.lora_down.weight": torch.zeros(4, 32)}, str(models / "loras" / "unpaired.safetensors"))
    plus = {"image_proj.latents": torch.zeros(1, 16, 768), "image_proj.proj_in.weight": torch.zeros(768, 32),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768), "ip_adapter.1.to_v_ip.weight": torch.zeros(320, 768)}
    save_file(plus, str(models / "ipadapter" / "plus_like.safetensors"))
    adapter = load_file(str(models / "ipadapter" / host_files["ipadapter"]))
    first = sorted(adapter)[0]
    adapter[first] = torch.full_like(adapter[first], float("inf"))
    save_file(adapter, str(models / "ipadapter" / "inf_adapter.safetensors"))
    save_file({"latent_tensor": torch.full((1, 4, 8, 8), float("nan"))}, str(inp / "nan.latent"))
    return {"outside": outside}


def _nan_latent(prompt):
    """std_image_stylize with its latent from core Load Latent (input/nan.latent: all NaN)."""
    stylize = next(k for k, v in prompt.items() if v["class_type"] == "STDStylize")
    prompt["99"] = {"class_type": "LoadLatent", "inputs": {"latent": "nan.latent"}}
    prompt[stylize]["inputs"]["latent_image"] = ["99", 0]


def _load_video(**inputs):
    node = {"class_type": "STDLoadVideo", "inputs": {"video": "std_content.mp4", "frame_load_cap": 4,
                                                     "skip_first_frames": 0, "select_every_nth": 1, "force_rate": 0.0,
                                                     "resize": "crop", "path": "", **inputs}}
    return {"1": node, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def _image_folder(**inputs):
    node = {"class_type": "STDLoadImageFolder", "inputs": {"folder": "std_photos", "image_load_cap": 0,
                                                           "skip_first_images": 0, "sort": "natural", "resize": "crop",
                                                           "mismatch": "crop to first", **inputs}}
    return {"1": node, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def _save_video(**inputs):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 3, "color": 0}},
            "2": {"class_type": "STDSaveVideo", "inputs": {"images": ["1", 0], "fps": 8.0,
                                                           "filename_prefix": "STD/bad", "format": "mp4", **inputs}}}


def _workflow(name, ckpt, host_files, edit):
    prompt = comfy_host.prepare_workflow(comfy_host.REPO / "example_workflows" / "api" / f"{name}.json", ckpt,
                                         host_files)
    edit(prompt)
    return prompt


def _set(node, **inputs):
    def edit(prompt):
        prompt[node]["inputs"].update(inputs)
    return edit


def _insert_patch(class_type, **inputs):
    """Put a model patch node ("20") between the LoRA loader and STD Stylize of std_image_stylize."""
    def edit(prompt):
        prompt["20"] = {"class_type": class_type, "inputs": {"model": ["2", 0], **inputs}}
        prompt["7"]["inputs"]["model"] = ["20", 0]
    return edit


def _style(**inputs):
    def edit(prompt):
        node = next(k for k, v in prompt.items() if v["class_type"] == "STDStyleReference")
        for k, v in inputs.items():
            if k in ("ipadapter_file",):
                loader = next(n for n, v2 in prompt.items() if v2["class_type"] == "STDIPAdapterLoader")
                prompt[loader]["inputs"][k] = v
            elif k == "clip_name":
                loader = next(n for n, v2 in prompt.items() if v2["class_type"] == "CLIPVisionLoader")
                prompt[loader]["inputs"][k] = v
            else:
                prompt[node]["inputs"][k] = v
    return edit


def _range(message: str, name: str) -> str:
    """How ComfyUI's validator names an out-of-range widget in its JSON answer."""
    return f'"message": "{message}", "details": "{name}"'


# (id, prompt builder(ckpt, host_files) -> prompt, expected fragment of the message)
CASES = [
    # STD Load Video: paths
    ("load-video-traversal", lambda c, f: _load_video(video="../secret/private.mp4"),
     "video: '../secret/private.mp4' is not a file in ComfyUI's input folder"),
    ("load-video-absolute-name", lambda c, f: _load_video(video="/etc/passwd"),
     "video: '/etc/passwd' is not a file in ComfyUI's input folder"),
    ("load-video-symlink-out", lambda c, f: _load_video(video="link_out.mp4"),
     "video: 'link_out.mp4' is not a file in ComfyUI's input folder"),
    ("load-video-missing", lambda c, f: _load_video(video="nope.mp4"), "video: 'nope.mp4' does not exist"),
    ("load-video-path-outside", lambda c, f: _load_video(path="/etc"),
     "path: '/etc' is outside ComfyUI's input and output folders; the server owner can allow more folders with the "
     "STD_ALLOWED_PATHS"),
    ("load-video-path-outside-missing", lambda c, f: _load_video(path="/nonexistent/clip.mp4"),
     "path: '/nonexistent/clip.mp4' is outside ComfyUI's input and output folders"),
    ("load-video-path-relative-escape", lambda c, f: _load_video(path="../secret/private.mp4"),
     "path: '../secret/private.mp4' is not a file in ComfyUI's input folder"),
    ("load-video-corrupt", lambda c, f: _load_video(video="broken.mp4"), "could not decode 'broken.mp4'"),
    ("load-video-empty-folder", lambda c, f: _load_video(path="empty_frames"), "folder 'empty_frames' has no image"),
    ("load-video-mixed-frame-sizes", lambda c, f: _load_video(path="mixed_frames"),
     "all frames must share one size"),
    ("load-video-nothing-left", lambda c, f: _load_video(skip_first_frames=1000), "no frames left"),
    ("load-video-negative-cap", lambda c, f: _load_video(frame_load_cap=-1), _range("Value -1 smaller than min of 0", "frame_load_cap")),
    ("load-video-bad-resize", lambda c, f: _load_video(resize="zoom"),
     lambda: comfy_host.choice_refusal("resize", "zoom", ["none", "crop", "pad", "stretch"],
                                       "resize: got 'zoom', choose one of none, crop, pad, stretch")),
    ("load-video-nth-zero", lambda c, f: _load_video(select_every_nth=0), _range("Value 0 smaller than min of 1", "select_every_nth")),
    # STD Load Image Folder
    ("image-folder-traversal", lambda c, f: _image_folder(folder="../secret"),
     "folder: '../secret' is not a file in ComfyUI's input folder"),
    ("image-folder-absolute", lambda c, f: _image_folder(folder="/etc"),
     "folder: '/etc' is not a file in ComfyUI's input folder"),
    ("image-folder-missing", lambda c, f: _image_folder(folder="no_such_folder"), "'no_such_folder' is not a folder"),
    ("image-folder-mixed-sizes-refused", lambda c, f: _image_folder(mismatch="refuse"),
     "'photo3.png' is 96x80 but the first image is 64x64"),
    ("image-folder-empty", lambda c, f: _image_folder(folder="empty_frames"), "'empty_frames' has no images"),
    ("image-folder-file-link-out", lambda c, f: _image_folder(folder="linked_out"),
     "'b.png' in 'linked_out' links to a file outside the folder"),
    ("load-video-frames-link-out", lambda c, f: _load_video(path="linked_out"),
     "'b.png' in 'linked_out' links to a file outside the folder"),
    ("image-folder-skip-all", lambda c, f: _image_folder(skip_first_images=50), "skipping 50 leaves none"),
    # STD Save Video
    ("save-video-fps-zero", lambda c, f: _save_video(fps=0.0), _range("Value 0.0 smaller than min of 0.01", "fps")),
    ("save-video-gif-too-fast", lambda c, f: _save_video(fps=100.0, format="gif"),
     "GIF stores frame delays in hundredths of a second"),
    ("save-video-bad-format", lambda c, f: _save_video(format="avi"),
     lambda: comfy_host.choice_refusal("format", "avi", ["mp4", "webm", "webp", "gif"],
                                       "format: got 'avi', choose one of mp4, webm, webp, gif")),
    ("save-video-prefix-escapes-output", lambda c, f: _save_video(filename_prefix="../../evil"),
     "filename_prefix: '../../evil' must be a name inside the output folder"),
    ("save-video-absolute-prefix", lambda c, f: _save_video(filename_prefix="/tmp/evil"),
     "must be a name inside the output folder"),
    ("save-video-prefix-nul", lambda c, f: _save_video(filename_prefix="STD/a\x00b"),
     "filename_prefix: contains control characters (U+0000)"),
    ("save-video-prefix-newline", lambda c, f: _save_video(filename_prefix="STD/a\nb"),
     "filename_prefix: contains control characters (U+000A)"),
    ("save-video-prefix-too-long", lambda c, f: _save_video(filename_prefix="STD/" + "x" * 300),
     "filename_prefix: is 304 characters long; at most 200"),
    # STD Stylize
    ("stylize-nfe-too-many", lambda c, f: _workflow("std_image_stylize", c, f, _set("7", nfe=40)),
     "nfe 40 at start_strength 0.75 needs 54 scheduler steps"),
    ("stylize-trained-start-too-many", lambda c, f: _workflow("std_image_stylize", c, f,
                                                              _set("7", nfe=45, plan="trained_start")),
     "with the trained_start plan needs more grid points"),
    ("stylize-eta-above-one", lambda c, f: _workflow("std_image_stylize", c, f, _set("7", start_strength=1.5)),
     _range("Value 1.5 bigger than max of 1.0", "start_strength")),
    ("stylize-gamma-above-one", lambda c, f: _workflow("std_image_stylize", c, f, _set("7", gamma=2.0)),
     _range("Value 2.0 bigger than max of 1.0", "gamma")),
    ("stylize-negative-cfg", lambda c, f: _workflow("std_image_stylize", c, f, _set("7", cfg=-1.0)),
     _range("Value -1.0 smaller than min of 0.0", "cfg")),
    ("stylize-unknown-plan", lambda c, f: _workflow("std_image_stylize", c, f, _set("7", plan="fast")),
     lambda: comfy_host.choice_refusal("plan", "fast", ["official", "trained_start"],
                                       "plan: got 'fast', choose one of official, trained_start")),
    ("stylize-flow-model", lambda c, f: _workflow("std_image_stylize", c, f,
                                                  _insert_patch("ModelSamplingSD3", shift=3.0)),
     "this is a flow-matching model"),
    ("stylize-lcm-schedule", lambda c, f: _workflow("std_image_stylize", c, f,
                                                    _insert_patch("ModelSamplingDiscrete", sampling="lcm",
                                                                  zsnr=False)),
     "STD needs the 1000-step schedule"),
    ("stylize-replaced-schedule", lambda c, f: _workflow("std_image_stylize", c, f,
                                                         _insert_patch("ModelSamplingDiscrete", sampling="eps",
                                                                       zsnr=True)),
     "the model's noise schedule was replaced"),
    # STD Stylize Video
    ("stylize-video-overlap-too-big", lambda c, f: _workflow("std_video_stylize", c, f,
                                                             _set(_node(c, f, "std_video_stylize", "STDStylizeVideo"),
                                                                  frames_per_batch=4, overlap=4)),
     "overlap: got 4, allowed range is [0, 3]"),
    ("stylize-video-unknown-noise", lambda c, f: _workflow("std_video_stylize", c, f,
                                                           _set(_node(c, f, "std_video_stylize", "STDStylizeVideo"),
                                                                noise="random")),
     lambda: comfy_host.choice_refusal("noise", "random", ["shared", "per_frame"],
                                       "noise: got 'random', choose one of shared, per_frame")),
    ("stylize-video-zero-batch", lambda c, f: _workflow("std_video_stylize", c, f,
                                                        _set(_node(c, f, "std_video_stylize", "STDStylizeVideo"),
                                                             frames_per_batch=0)),
     _range("Value 0 smaller than min of 1", "frames_per_batch")),
    # STD Schedule / STD Sampler
    ("schedule-nfe-zero", lambda c, f: _workflow("std_image_custom_sampler", c, f,
                                                 _set(_node(c, f, "std_image_custom_sampler", "STDSchedule"),
                                                      nfe=0)), _range("Value 0 smaller than min of 1", "nfe")),
    ("sampler-gamma-negative", lambda c, f: _workflow("std_image_custom_sampler", c, f,
                                                      _set(_node(c, f, "std_image_custom_sampler", "STDSampler"),
                                                           gamma=-0.5)),
     _range("Value -0.5 smaller than min of 0.0", "gamma")),
    # STD LoRA Loader
    ("lora-missing", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", lora_name="nope.safetensors")),
     "lora_name: 'nope.safetensors' was not found in the models/loras folder"),
    ("lora-traversal", lambda c, f: _workflow("std_image_stylize", c, f,
                                              _set("2", lora_name="../../input/std_content.png")),
     "was not found in the models/loras folder"),
    ("lora-corrupt", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", lora_name="corrupt.safetensors")),
     "could not read 'corrupt.safetensors'"),
    ("lora-nan", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", lora_name="nan.safetensors")),
     "non-finite value(s) (NaN or inf)"),
    ("lora-int8", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", lora_name="int8.safetensors")),
     "is int8; LoRA weights are float tensors"),
    ("lora-unpaired", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", lora_name="unpaired.safetensors")),
     "has a lora_down factor but no lora_up"),
    ("lora-text-encoder-only", lambda c, f: _workflow("std_image_stylize", c, f,
                                                      _set("2", lora_name="text_only.safetensors")),
     "has no UNet LoRA weights"),
    ("lora-other-base", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", lora_name="sdxl_only.safetensors")),
     "made for another base model"),
    ("lora-strength-out-of-range", lambda c, f: _workflow("std_image_stylize", c, f, _set("2", strength=9.0)),
     _range("Value 9.0 bigger than max of 4.0", "strength")),
    # STD IP-Adapter Loader / STD Style Reference
    ("ipadapter-missing", lambda c, f: _workflow("std_image_style_reference", c, f,
                                                 _style(ipadapter_file="nope.safetensors")),
     "ipadapter_file: 'nope.safetensors' was not found in the models/ipadapter folder"),
    ("ipadapter-corrupt", lambda c, f: _workflow("std_image_style_reference", c, f,
                                                 _style(ipadapter_file="corrupt.safetensors")),
     "could not read 'corrupt.safetensors'"),
    ("ipadapter-inf", lambda c, f: _workflow("std_image_style_reference", c, f,
                                             _style(ipadapter_file="inf_adapter.safetensors")),
     "non-finite value(s) (NaN or inf); the file is damaged"),
    ("latent-nan", lambda c, f: _workflow("std_image_stylize", c, f, _nan_latent),
     "latent_image: the latent holds 256 non-finite value(s) (NaN or inf) of 256"),
    ("ipadapter-plus-file", lambda c, f: _workflow("std_image_style_reference", c, f,
                                                   _style(ipadapter_file="plus_like.safetensors")),
     "IP-Adapter Plus (resampler) files are not supported"),
    ("style-adapter-for-sdxl", lambda c, f: _workflow("std_image_style_reference", c, f,
                                                      _style(ipadapter_file="tiny_sdxl_shaped.safetensors")),
     "this is an SDXL IP-Adapter"),
    ("style-encoder-width", lambda c, f: _workflow("std_image_style_reference", c, f,
                                                   _style(clip_name="tiny_clip_vision_48.safetensors")),
     "gives image embeddings of width 48 but this IP-Adapter expects 32"),
    ("style-percent-order", lambda c, f: _workflow("std_image_style_reference", c, f,
                                                   _style(start_percent=0.8, end_percent=0.2)),
     "start_percent/end_percent: need 0 <= start (0.8) <= end (0.2) <= 1"),
    ("style-weight-out-of-range", lambda c, f: _workflow("std_image_style_reference", c, f, _style(weight=7.0)),
     _range("Value 7.0 bigger than max of 3.0", "weight")),
    # SiD
    ("sid-width-not-multiple-of-8", lambda c, f: _workflow("sid_onestep", c, f,
                                                           _set(_node(c, f, "sid_onestep", "SiDOneStep"), width=100)),
     "width: got 100, must be a multiple of 8"),
    ("sid-batch-zero", lambda c, f: _workflow("sid_onestep", c, f,
                                              _set(_node(c, f, "sid_onestep", "SiDOneStep"), batch_size=0)),
     _range("Value 0 smaller than min of 1", "batch_size")),
    ("sid-t-init-out-of-range", lambda c, f: _workflow("sid_onestep", c, f,
                                                       _set(_node(c, f, "sid_onestep", "SiDOneStep"), t_init=1000)),
     _range("Value 1000 bigger than max of 999", "t_init")),
]


def _node(ckpt, host_files, workflow, class_type):
    prompt = json.loads((comfy_host.REPO / "example_workflows" / "api" / f"{workflow}.json").read_text())
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


@pytest.mark.bad_input
@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_node_input_is_refused_with_a_clear_message(host, tiny_ckpt, host_files, files, build, expected):
    msg = comfy_host.client_message(build(tiny_ckpt, host_files))
    expected = expected() if callable(expected) else expected  # host-dependent: see comfy_host.choice_refusal
    assert expected in msg, msg
    assert str(host.base) not in msg  # never echo the server's own paths to a client


def test_the_server_still_runs_a_good_prompt_and_allowed_folders_work(host, tiny_ckpt, host_files, files,
                                                                      monkeypatch):
    ex, server = comfy_host.execute(_load_video())
    assert ex.success, [d for e, d in server.events if e == "execution_error"]
    assert asyncio.run(_validate_ok(_load_video(path=str(files["outside"] / "private.mp4"))))
    ex, server = comfy_host.execute(_load_video(path=str(files["outside"] / "private.mp4")))
    assert not ex.success  # off by default
    monkeypatch.setenv("STD_ALLOWED_PATHS", str(files["outside"]))
    ex, server = comfy_host.execute(_load_video(path=str(files["outside"] / "private.mp4"), frame_load_cap=3))
    assert ex.success, [d for e, d in server.events if e == "execution_error"]
    ex, _ = comfy_host.execute(_load_video(path=str(host.base / "input" / "std_content.mp4"), frame_load_cap=2))
    assert ex.success  # absolute paths inside the input folder are always fine


async def _validate_ok(prompt):
    import execution

    ok, *_ = await execution.validate_prompt("ok", prompt, None)
    return ok


def test_fingerprint_does_not_probe_outside_files(host, files):
    node = host.M["STDLoadVideo"]
    assert node.fingerprint_inputs("std_content.mp4", path=str(files["outside"] / "private.mp4")) == ""
    assert node.fingerprint_inputs("std_content.mp4") != ""
    assert os.path.exists(files["outside"] / "private.mp4")
