"""LoRA export in the formats users load: kohya (ComfyUI LoraLoader, Forge, A1111) and diffusers/PEFT.

Both files carry the ``std.*`` metadata the ComfyUI nodes and the Gradio app read (method, η, start index,
recommended NFE and gamma, base model, resolution, rr, steps, rank, alpha). A video adapter's motion-module LoRA
tensors are in the PEFT file with the rest (one v2v file, as the released ones) and alone in ``*_motion.safetensors``
(for the ComfyUI motion-LoRA node); the kohya file holds the image layers only, since image LoRA loaders have no place
for them. Files are written atomically and
are world-readable (0644), so another user's ComfyUI can read them.

Two layouts:

* :func:`export_lora`: one trained adapter as it is (rank r, alpha as trained);
* :func:`export_layers`: any set of per-layer factors (:class:`std_hf.lora.LoraLayer`, strength folded in, so
  alpha = rank per layer): the trainer's "student" export, base + style LoRA(s) + STD delta concatenated along the
  rank, which loaded alone on the base reproduces the trained student.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_std.core.lora_format import encode_std_metadata, is_motion_key, to_kohya
from std_hf.lora import LoraLayer
from training.common.state import atomic_file

FILE_MODE = 0o644
DIR_MODE = 0o755
#: kohya prefix per model (SD1.5 names its single text encoder lora_te_, SDXL lora_te1_/lora_te2_)
KOHYA_TEXT = {"sd15": {"text_encoder": "lora_te_"},
              "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a .safetensors file under a temporary name and rename it when complete, mode 0644; on any error the
    temporary file is removed and ``path`` keeps what it held."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, FILE_MODE)
    return path


@contextmanager
def atomic_folder(final: Path):
    """Write a folder atomically: the block writes into a temporary sibling folder, which replaces ``final`` when
    the block completes (files 0644, folders 0755, so another user's ComfyUI can read them); on any error it is
    removed and ``final`` keeps what it held."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)
        if final.exists():
            os.replace(final, old)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def peft_unet_state_dict(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """``unet.<module>.lora_A/B.weight`` tensors of one adapter (diffusers' LoRA file layout)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"unet.{k}": v.float() for k, v in sd.items()}


def _kohya_meta(meta: dict, rank: int, alpha: float, arch: str) -> dict:
    return {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1"}


def export_lora(unet, adapter_name: str, folder: Path, name: str, rank: int, alpha: float,
                std_values: dict, arch: str, dtype=torch.float16) -> list[Path]:
    """Write ``<name>.safetensors`` (kohya, the image layers), ``<name>_diffusers.safetensors`` (PEFT, every layer)
    and, for a video adapter, ``<name>_motion.safetensors`` (its motion-module layers alone). Returns the paths
    written."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_sd = peft_unet_state_dict(unet, adapter_name)
    if not peft_sd:
        raise RuntimeError(f"export: the UNet has no '{adapter_name}' LoRA weights")
    meta = encode_std_metadata({**std_values, "rank": int(rank), "alpha": float(alpha)})
    kohya, motion = to_kohya(peft_sd, alpha=alpha)
    paths = [atomic_save({k: (v.to(dtype) if v.ndim else v) for k, v in kohya.items()},
                         folder / f"{name}.safetensors", _kohya_meta(meta, rank, alpha, arch))]
    config = unet.peft_config[adapter_name].to_dict()
    config = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    peft_meta = {**meta, "format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str)}
    # the PEFT file holds the whole adapter (a v2v LoRA's motion layers too, as the released v2v LoRAs do: the app and
    # the batch CLI apply it whole with a motion module); kohya loaders get the image part, ComfyUI's motion node the
    # motion part
    paths.append(atomic_save({k: v.to(dtype) for k, v in peft_sd.items()}, folder / f"{name}_diffusers.safetensors",
                             peft_meta))
    if motion:
        paths.append(atomic_save({k: v.to(dtype) for k, v in motion.items()}, folder / f"{name}_motion.safetensors",
                                 peft_meta))
    return paths


def combine(*sets: dict[tuple[str, str], LoraLayer]) -> dict[tuple[str, str], LoraLayer]:
    """Per layer, the LoRAs of all sets side by side (ranks add up): their deltas sum exactly."""
    out: dict[tuple[str, str], LoraLayer] = {}
    for layers in sets:
        for key, layer in layers.items():
            out[key] = out[key].concat(layer) if key in out else layer
    return out


def _canonical_text(path: str) -> str:
    return path if path.startswith(("text_model.", "text_projection")) else "text_model." + path


def export_layers(layers: dict[tuple[str, str], LoraLayer], folder: Path, name: str, std_values: dict, arch: str,
                  dtype=torch.float16) -> list[Path]:
    """Write per-layer factors (strength folded in: alpha = rank per layer) as ``<name>.safetensors`` (kohya) and
    ``<name>_diffusers.safetensors`` (PEFT, unet./text_encoder./text_encoder_2. keys, motion-module layers included);
    the motion-module layers also alone in ``<name>_motion.safetensors``. Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    kohya, peft, motion = {}, {}, {}
    for (model, path), layer in sorted(layers.items()):
        down, up = layer.down.float(), layer.up.float()
        if model == "unet":
            key_k, key_p = "lora_unet_" + path.replace(".", "_"), "unet." + path
        else:
            canonical = _canonical_text(path)
            key_k, key_p = KOHYA_TEXT[arch][model] + canonical.replace(".", "_"), f"{model}.{canonical}"
        if is_motion_key(path):  # in the PEFT file with the rest, and alone in the motion file
            motion[f"{key_p}.lora_A.weight"], motion[f"{key_p}.lora_B.weight"] = down.to(dtype), up.to(dtype)
            peft.update(motion)
            continue
        kohya[f"{key_k}.lora_down.weight"], kohya[f"{key_k}.lora_up.weight"] = down.to(dtype), up.to(dtype)
        kohya[f"{key_k}.alpha"] = torch.tensor(float(layer.rank))
        peft[f"{key_p}.lora_A.weight"], peft[f"{key_p}.lora_B.weight"] = down.to(dtype), up.to(dtype)
    if not kohya:
        raise RuntimeError("export: no LoRA layers to write")
    ranks = Counter(layer.rank for layer in layers.values())
    rank = ranks.most_common(1)[0][0]
    meta = encode_std_metadata({**std_values, "rank": int(rank), "alpha": float(rank),
                                "max_rank": int(max(ranks))})
    paths = [atomic_save(kohya, folder / f"{name}.safetensors", _kohya_meta(meta, rank, float(rank), arch)),
             atomic_save(peft, folder / f"{name}_diffusers.safetensors", {**meta, "format": "pt"})]
    if motion:
        paths.append(atomic_save(motion, folder / f"{name}_motion.safetensors", {**meta, "format": "pt"}))
    return paths
