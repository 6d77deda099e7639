"""Video mode: a diffusers MotionAdapter (AnimateDiff) inserted into teacher and student."""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError

TINY_MOTION = dict(block_out_channels=(16, 16, 32, 32), motion_layers_per_block=1,
                   motion_transformer_layers_per_block=1, motion_mid_block_layers_per_block=1,
                   motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=32,
                   use_motion_mid_block=False)


def attach_motion_adapter(unet: torch.nn.Module, spec: str, seed: int = 0) -> torch.nn.Module:
    """The UNet with a MotionAdapter inserted: ``tiny`` (random, from ``seed``), a folder or a Hub id (safetensors
    only, every weight loaded)."""
    from diffusers import MotionAdapter, UNetMotionModel

    if not spec:
        raise STDInputError("motion_adapter", "video mode needs a motion module (--motion-adapter: a diffusers "
                                              "MotionAdapter folder such as guoyww/animatediff-motion-adapter-v1-5-3, "
                                              "or 'tiny')")
    if spec == "tiny":
        cfg = dict(TINY_MOTION, block_out_channels=tuple(unet.config.block_out_channels))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = MotionAdapter(**cfg)
    else:
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not path.exists():
            raise STDInputError("motion_adapter", f"{path} does not exist")
        try:
            adapter, info = MotionAdapter.from_pretrained(str(path) if path.exists() else spec, use_safetensors=True,
                                                          output_loading_info=True)
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
