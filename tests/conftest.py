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
