"""Boot ComfyUI (COMFYUI_PATH) in-process on CPU with the tests' tiny SD1.5-shaped checkpoint, for the benchmarks."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import comfy_host  # noqa: E402


def require_comfyui() -> None:
    if not comfy_host.comfyui_path():
        sys.exit("this benchmark runs the ComfyUI nodes: set COMFYUI_PATH to a ComfyUI checkout (0.3.64)")


def boot_tiny():
    """(host, model, clip, vae, positive, negative) with a tiny random checkpoint in a temporary folder."""
    require_comfyui()
    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="std-bench-")))
    ckpt = host.base / "models" / "checkpoints" / "tiny_sd15.safetensors"
    comfy_host.build_tiny_sd15(ckpt)
    with torch.inference_mode():
        model, clip, vae = host.M["CheckpointLoaderSimple"]().load_checkpoint(ckpt.name)[:3]
        enc = host.M["CLIPTextEncode"]()
        pos = enc.encode(clip, "a painting")[0]
        neg = enc.encode(clip, "")[0]
    return host, model, clip, vae, pos, neg
