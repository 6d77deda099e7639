"""LoRA export in the formats users load: kohya (ComfyUI LoraLoader, Forge, A1111) and diffusers/PEFT.

Both files carry the ``std.*`` metadata the ComfyUI nodes and the Gradio app read (method, η, start index,
recommended NFE and gamma, base model, resolution, rr, steps, rank, alpha). Motion-module LoRA tensors go to their
own ``*_motion.safetensors`` file, since image LoRA loaders have no place for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_std.core.lora import encode_std_metadata, to_kohya


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def peft_unet_state_dict(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """``unet.<module>.lora_A/B.weight`` tensors of one adapter (diffusers' LoRA file layout)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"unet.{k}": v.float() for k, v in sd.items()}


def export_lora(unet, adapter_name: str, folder: Path, name: str, rank: int, alpha: float,
                std_values: dict, arch: str, dtype=torch.float16) -> list[Path]:
    """Write ``<name>.safetensors`` (kohya), ``<name>_diffusers.safetensors`` (PEFT) and, if any,
    ``<name>_motion.safetensors``. Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_sd = peft_unet_state_dict(unet, adapter_name)
    if not peft_sd:
        raise RuntimeError(f"export: the UNet has no '{adapter_name}' LoRA weights")
    meta = encode_std_metadata({**std_values, "rank": int(rank), "alpha": float(alpha)})
    kohya, motion = to_kohya(peft_sd, alpha=alpha)
    kohya_meta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                  "ss_network_alpha": str(alpha),
                  "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1"}
    paths = [_atomic_save({k: (v.to(dtype) if v.ndim else v) for k, v in kohya.items()},
                          folder / f"{name}.safetensors", kohya_meta)]
    config = unet.peft_config[adapter_name].to_dict()
    config = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    peft_meta = {**meta, "format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str)}
    image_peft = {k: v.to(dtype) for k, v in peft_sd.items() if k not in motion}
    paths.append(_atomic_save(image_peft, folder / f"{name}_diffusers.safetensors", peft_meta))
    if motion:
        paths.append(_atomic_save({k: v.to(dtype) for k, v in motion.items()}, folder / f"{name}_motion.safetensors",
                                  peft_meta))
    return paths
