"""STDMotionLoraLoader: the motion-module part of an STD v2v LoRA on an AnimateDiff-Evolved motion model.

STD's video LoRAs were distilled with a motion module in teacher and student and carry LoRA factors on the motion
modules' linear layers, named by diffusers' motion-model paths (``core/motion_format``). AnimateDiff-Evolved keeps
every motion model (AnimateDiff, AnimateDiff-SDXL, Hotshot-XL) in the AnimateDiff layout inside a ComfyUI
``ModelPatcher`` (its ``MOTION_MODEL_ADE`` type); this node maps the model's linear layers to diffusers paths, checks
that every motion layer of the LoRA fits, and adds each layer's ``alpha/rank · up @ down`` to a clone of the patcher
as a weight-difference patch, the form AnimateDiff-Evolved's own motion-LoRA loader uses. AnimateDiff-Evolved then
applies the patches whenever it loads the motion model for sampling, like ComfyUI applies image LoRAs.

The node does not import AnimateDiff-Evolved: the type is declared by name, so the pack loads without it.
"""

from __future__ import annotations

import logging

import torch

import folder_paths
from comfy_api.latest import io

from ..core.errors import STDInputError, redact_paths
from ..core.lora_format import is_motion_key, peft_alpha_from_metadata
from ..core.motion_format import animatediff_to_diffusers, check_motion_lora, motion_lora_layers
from .comfy_compat import OWN_CHECK
from .common import CATEGORY_LOADERS
from .lora_loader import load_lora_file

log = logging.getLogger("comfyui_std")

#: AnimateDiff-Evolved's motion model (a ModelPatcher around its AnimateDiffModel), declared by name
MotionModelADE = io.Custom("MOTION_MODEL_ADE")

NOT_ADE = ("motion_model: expected AnimateDiff-Evolved's MOTION_MODEL_ADE (the output of its Load AnimateDiff Model "
           "node)")


def motion_linears(motion_model) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """The linear layers inside the motion modules of an AnimateDiff-Evolved motion model: ({diffusers module path:
    the model's own weight key}, {diffusers module path: (out, in)})."""
    model = getattr(motion_model, "model", None)
    if model is None or not hasattr(motion_model, "add_patches") or not hasattr(model, "named_modules"):
        raise ValueError(NOT_ADE)
    keys, shapes = {}, {}
    for name, module in model.named_modules():
        if "motion_modules." in name and isinstance(module, torch.nn.Linear):
            path = animatediff_to_diffusers(name + ".")[:-1]
            keys[path] = name + ".weight"
            shapes[path] = (int(module.out_features), int(module.in_features))
    if not keys:
        raise ValueError(NOT_ADE + "; this one has no motion-module layers")
    return keys, shapes


def motion_model_label(motion_model) -> str:
    """How the report and the messages name the motion model (AnimateDiff-Evolved's own description of it)."""
    info = getattr(getattr(motion_model, "model", None), "mm_info", None)
    if info is None:
        return "motion model"
    fmt = {"HotshotXL": "Hotshot-XL"}.get(getattr(info, "mm_format", ""), getattr(info, "mm_format", ""))
    version = getattr(info, "mm_version", "")
    version = f" {version}" if version and fmt == "AnimateDiff" else ""
    return f"motion model '{getattr(info, 'mm_name', '?')}' ({fmt}{version} for {getattr(info, 'sd_type', '?')})"


def apply_motion_lora(motion_model, name: str, strength: float):
    """Return (patched motion model clone, report string); raise ValueError with a message for misfits."""
    keys, shapes = motion_linears(motion_model)
    sd, metadata = load_lora_file(name)
    motion = {k: v for k, v in sd.items() if is_motion_key(k)}
    if not motion:
        raise ValueError(f"lora_name: '{name}' has no motion-module tensors: it is an image LoRA; use STD LoRA Loader "
                         "(a v2v LoRA carries both parts: load it in STD LoRA Loader and here)")
    label = motion_model_label(motion_model)
    try:
        layers = motion_lora_layers(motion, list(shapes), alpha=peft_alpha_from_metadata(metadata),
                                    name=f"'{name}'")
        check_motion_lora(layers, shapes, f"'{name}'", label)
    except STDInputError as err:
        raise ValueError("lora_name: " + redact_paths(str(err).split(": ", 1)[1])) from None
    used = sum(1 for k in motion if "motion_modules" in k)  # every such tensor went into a layer (or was refused)
    if used < len(motion):
        first = next(k for k in motion if "motion_modules" not in k)
        log.warning("STD motion LoRA %s: %d motion tensors name no motion-module layer and are not applied (first: "
                    "%s)", name, len(motion) - used, first)
    patched = motion_model.clone()
    if strength == 0:  # nothing to add: the clone is the motion model as it was (the file was still checked)
        report = (f"STD motion LoRA: {used}/{len(motion)} tensors fit ({len(layers)} layers) from {name} on the "
                  f"{label}; strength 0: the motion model is unchanged")
        return patched, report
    patches = {keys[path]: (layer.delta(1.0),) for path, layer in layers.items()}
    added = patched.add_patches(patches, strength_patch=float(strength))
    if len(added) != len(patches):
        missing = sorted(set(patches) - set(added))
        raise ValueError(f"lora_name: '{name}': {len(missing)} layers could not be patched on the {label} (first: "
                         f"{missing[0]})")
    report = (f"STD motion LoRA: {used}/{len(motion)} tensors applied ({len(layers)} layers) from {name} to the "
              f"{label}, strength {float(strength):g}")
    return patched, report


class STDMotionLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDMotionLoraLoader",
            display_name="STD Motion LoRA (AnimateDiff-Evolved)",
            category=CATEGORY_LOADERS,
            description="Applies the motion-module part of an STD v2v LoRA to an AnimateDiff-Evolved motion model "
                        "(from its Load AnimateDiff Model node), so the motion module runs as it was distilled. The "
                        "image part of the same file goes through STD LoRA Loader. A LoRA made for another motion "
                        "module is refused before anything is sampled.",
            inputs=[
                MotionModelADE.Input("motion_model",
                                     tooltip="AnimateDiff-Evolved's motion model (Load AnimateDiff Model): the module "
                                             "the v2v LoRA was distilled with."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="An STD v2v LoRA in models/loras (the file STD LoRA Loader loads too)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                               tooltip="Strength of the motion part; STD students are meant to run at 1.0."),
            ],
            outputs=[MotionModelADE.Output(display_name="MOTION_MODEL",
                                           tooltip="A patched copy of the motion model, for Apply AnimateDiff "
                                                   "Model.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name):
        """ComfyUI leaves ``lora_name`` to this node, which checks it when it runs (see comfy_compat)."""
        return OWN_CHECK

    @classmethod
    def execute(cls, motion_model, lora_name, strength=1.0) -> io.NodeOutput:
        patched, report = apply_motion_lora(motion_model, lora_name, strength)
        log.info(report)
        return io.NodeOutput(patched, ui={"text": [report]})


NODES = [STDMotionLoraLoader]
