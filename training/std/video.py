"""Video mode: a motion module (AnimateDiff family) inserted into teacher and student as diffusers'
``UNetMotionModel``, from the files users have (:func:`std_hf.motion.load_motion_adapter`) or a Hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.motion_format import check_base

log = logging.getLogger("training")


def attach_motion_adapter(unet: torch.nn.Module, spec: str, seed: int = 0, arch: str | None = None,
                          base_label: str = "the base model") -> torch.nn.Module:
    """The UNet with a motion module inserted: ``tiny`` (random, from ``seed``), a motion-module file (AnimateDiff
    v2/v3, AnimateDiff-SDXL, Hotshot-XL; .safetensors, or .ckpt through torch's weights-only loader), a diffusers
    MotionAdapter folder, or a Hub id (safetensors only). Every tensor is loaded; a module for the other base is
    refused naming both."""
    from std_hf.motion import load_motion_adapter, motion_unet

    if not spec:
        raise STDInputError("motion_adapter", "video mode needs a motion module (--motion-adapter: a file from "
                                              "ComfyUI/models/animatediff_models such as mm_sdxl_v10_beta.ckpt or "
                                              "hsxl_temporal_layers.safetensors, a diffusers MotionAdapter folder, "
                                              "or 'tiny')")
    path = Path(spec).expanduser()
    if spec != "tiny" and not path.exists() and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return _from_hub(unet, spec)
    module = load_motion_adapter(spec, like_unet=unet, seed=seed, label="motion_adapter")
    if arch is not None and spec != "tiny":
        check_base(module.info, arch, module.name, base_label)
    log.info("motion module %s: %s", module.name, module.line())
    return motion_unet(unet, module)


def _from_hub(unet, spec: str):
    from diffusers import MotionAdapter, UNetMotionModel

    try:
        adapter, info = MotionAdapter.from_pretrained(spec, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise STDInputError("motion_adapter", f"could not load '{spec}' ({str(err).splitlines()[0]})") from None
    if info.get("missing_keys"):
        raise STDInputError("motion_adapter", f"'{spec}' lacks {len(info['missing_keys'])} weights (e.g. "
                                              f"{info['missing_keys'][0]})")
    try:
        return UNetMotionModel.from_unet2d(unet, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise STDInputError("motion_adapter", f"{spec} does not fit this base model ({err}); use an SD1.5 adapter "
                                              "for SD1.5 and an SDXL adapter for SDXL") from None
