"""Shared fixtures. Real-host fixtures skip (with the reason shown by -ra) unless COMFYUI_PATH is set."""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import comfy_host  # noqa: E402

REAL_HOST_REASON = ("real-host test: set COMFYUI_PATH to a ComfyUI checkout (pinned 0.3.64, commit a125cd84) to run it")


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    if not comfy_host.comfyui_path():
        pytest.skip(REAL_HOST_REASON)
    host = comfy_host.boot(tmp_path_factory.mktemp("comfy"))
    assert host.loaded, "the pack failed to load in ComfyUI (see log)"
    return host


@pytest.fixture(scope="session")
def tiny_ckpt(host):
    path = host.base / "models" / "checkpoints" / "tiny_sd15.safetensors"
    if not path.exists():
        comfy_host.build_tiny_sd15(path)
    return path.name


@pytest.fixture(scope="session")
def tiny_models(host, tiny_ckpt):
    """(model, clip, vae) of the tiny checkpoint, loaded once."""
    import torch

    with torch.inference_mode():
        return host.M["CheckpointLoaderSimple"]().load_checkpoint(tiny_ckpt)[:3]


@pytest.fixture(scope="session")
def style_files(host, tiny_models):
    """Tiny IP-Adapters (one for this model, one SDXL-shaped), tiny CLIP vision encoders (projection 32 and 48), a
    corrupt adapter file and a style image in input/; returns names and the loaded encoders."""
    import numpy as np
    import torch
    from PIL import Image

    models = host.base / "models"
    comfy_host.write_tiny_ip_adapter(tiny_models[0], models / "ipadapter" / "tiny_ip_adapter.safetensors")
    comfy_host.write_tiny_ip_adapter(tiny_models[0], models / "ipadapter" / "tiny_sdxl_shaped.safetensors",
                                     cross_dim=2048, num_layers=70)
    comfy_host.write_tiny_clip_vision(host.base, models / "clip_vision" / "tiny_clip_vision.safetensors")
    comfy_host.write_tiny_clip_vision(host.base, models / "clip_vision" / "tiny_clip_vision_48.safetensors",
                                      projection_dim=48)
    (models / "ipadapter" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(host.base / "input" / "std_style.png")
    with torch.inference_mode():
        clip_vision = host.M["CLIPVisionLoader"]().load_clip("tiny_clip_vision.safetensors")[0]
        clip_vision_48 = host.M["CLIPVisionLoader"]().load_clip("tiny_clip_vision_48.safetensors")[0]
    return {"ipadapter": "tiny_ip_adapter.safetensors", "clip_name": "tiny_clip_vision.safetensors",
            "clip_vision": clip_vision, "clip_vision_48": clip_vision_48}
