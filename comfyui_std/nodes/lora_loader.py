"""STDLoraLoader: load an STD LoRA in any common format (the released diffusers/PEFT files included)."""

from __future__ import annotations

import logging

import comfy.lora
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..core.lora_format import (check_lora_tensors, lora_module_names, peft_alpha_from_metadata, std_metadata,
                                to_kohya)
from .comfy_compat import OWN_CHECK
from .common import CATEGORY_LOADERS

log = logging.getLogger("comfyui_std")


def load_lora_file(name: str):
    """(state_dict, metadata) of a file in models/loras; clear errors for missing or corrupt files."""
    path = folder_paths.get_full_path("loras", name) if name else None
    if not path:
        raise ValueError(f"lora_name: '{name}' was not found in the models/loras folder")
    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise ValueError(f"lora_name: could not read '{name}' as a LoRA file ({type(err).__name__}: {err})") from None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"lora_name: '{name}' holds no tensors")
    check_lora_tensors(sd, f"lora_name: '{name}'")
    return sd, metadata or {}


def apply_std_lora(model, name: str, strength: float):
    """Return (patched model clone, std metadata, report string)."""
    sd, metadata = load_lora_file(name)
    kohya, motion = to_kohya(sd, alpha=peft_alpha_from_metadata(metadata))
    info = std_metadata(metadata, name)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    modules = lora_module_names(kohya)
    unet_modules = {m for m in modules if m.startswith(("lora_unet_", "lycoris_"))}
    matched = {m for m in unet_modules if m in key_map}
    if not unet_modules:
        raise ValueError(f"lora_name: '{name}' has no UNet LoRA weights this loader understands")
    if not matched:
        raise ValueError(f"lora_name: none of the {len(unet_modules)} layers of '{name}' exist in this model; it was "
                         f"probably made for another base model (e.g. an SDXL LoRA on SD1.5)")
    missing = sorted(unet_modules - matched)
    if missing:
        log.warning("STD LoRA %s: %d of %d layers do not exist in this model (first: %s)", name, len(missing),
                    len(unet_modules), missing[0])
    if motion:
        log.warning("STD LoRA %s: %d motion-module tensors: apply them to the AnimateDiff-Evolved motion model with "
                    "STD Motion LoRA (AnimateDiff-Evolved)", name, len(motion))
    patched = model
    if strength != 0:
        unet_only = {k: v for k, v in kohya.items() if k.split(".")[0] in matched}
        patched, _ = comfy.sd.load_lora_for_models(model, None, unet_only, strength, 0)
    eta = info.get("start_strength")
    report = (f"STD LoRA {name}: {len(matched)}/{len(unet_modules)} layers applied"
              + (f", trained for start_strength {eta}" if eta is not None else "")
              + (f", recommended nfe {info['nfe']}" if "nfe" in info else "")
              + (f", one-step generator at t_init {info['t_init']}" if "t_init" in info else "")
              + (f"; header values ignored (out of range): {', '.join(info['invalid'])}" if info.get("invalid")
                 else ""))
    return patched, info, report


class STDLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDLoraLoader",
            display_name="STD LoRA Loader",
            category=CATEGORY_LOADERS,
            description="Loads an STD LoRA from models/loras in kohya, diffusers/PEFT (the released "
                        "std_sdxl_*_eta*.safetensors files) or old diffusers format, and reports the start_strength "
                        "it was trained for. Every layer is applied, or the node says which are not.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the STD LoRA was distilled from (or a fine-tune of it)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="An STD LoRA in models/loras."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                               tooltip="LoRA strength; STD students are meant to run at 1.0."),
            ],
            outputs=[io.Model.Output(),
                     io.Float.Output(display_name="start_strength",
                                     tooltip="The η the LoRA was trained for (0.75 when unknown)."),
                     io.Int.Output(display_name="t_init",
                                   tooltip="For SiD-LSG one-step LoRAs: the generator's t_init (625 when unknown).")],
        )

    @classmethod
    def validate_inputs(cls, lora_name):
        """ComfyUI leaves ``lora_name`` to this node, which checks it when it runs (see comfy_compat)."""
        return OWN_CHECK

    @classmethod
    def execute(cls, model, lora_name, strength=1.0) -> io.NodeOutput:
        patched, info, report = apply_std_lora(model, lora_name, strength)
        log.info(report)
        eta = info.get("start_strength")
        t_init = info.get("t_init")
        return io.NodeOutput(patched, float(eta) if isinstance(eta, (int, float)) else 0.75,
                             int(t_init) if isinstance(t_init, (int, float)) else 625, ui={"text": [report]})


NODES = [STDLoraLoader]
