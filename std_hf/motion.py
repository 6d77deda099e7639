"""Motion modules from the files users have, loaded strictly into diffusers, and a v2v LoRA's motion part on them.

Sources (:func:`load_motion_adapter`): a file in ComfyUI's ``models/animatediff_models/`` (the folder
AnimateDiff-Evolved reads) or a path: AnimateDiff v2/v3 for SD1.5, AnimateDiff-SDXL, Hotshot-XL, as ``.safetensors``
(read directly) or ``.ckpt``/``.pt``/``.pth`` (only through torch's weights-only loader, as ComfyUI loads them: no
code runs); a diffusers ``MotionAdapter`` folder; or ``tiny`` (random, for tests and CPU smoke runs). The layout and
base are read from the tensors (:mod:`comfyui_std.core.motion_format`); every tensor of the motion part is loaded
into a ``MotionAdapter`` with a strict ``load_state_dict`` and counted in the report, so nothing is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.motion_format import (MotionInfo, MotionLoraLayer, adapter_config, check_motion_lora,
                                            motion_lora_layers, to_diffusers)
from comfyui_std.core.tensors import check_weights
from std_hf.files import first_line, read_safetensors, resolve

log = logging.getLogger("std_hf")

#: a random motion module for the tiny zoo (``tiny``): AnimateDiff's structure at the zoo's widths
TINY_MOTION = dict(motion_layers_per_block=1, motion_transformer_layers_per_block=1,
                   motion_mid_block_layers_per_block=1, motion_num_attention_heads=2, motion_norm_num_groups=8,
                   motion_max_seq_length=32, use_motion_mid_block=False)
PICKLED = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class MotionModule:
    adapter: object          # diffusers MotionAdapter
    info: MotionInfo
    name: str
    path: Path | None = None  # the file or folder it came from (None: tiny)

    def line(self) -> str:
        return f"{self.info.label()}: {self.info.tensors}/{self.info.tensors} tensors loaded"


def read_weights(path: Path, label: str = "motion_module") -> dict[str, torch.Tensor]:
    """The tensors of a motion-module file: safetensors directly, pickled files only with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        data = read_safetensors(path, label)[0]
        check_weights(data, label, path.name)
        return data
    if path.suffix not in PICKLED:
        raise STDInputError(label, f"'{path.name}': a motion module is a .safetensors or .ckpt file (or a diffusers "
                                   "MotionAdapter folder)")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign or code-carrying pickles: many types
        raise STDInputError(label, f"'{path.name}' could not be read as weights ({type(err).__name__}: "
                                   f"{first_line(err)}); only plain tensor files load, nothing in them is run") \
            from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise STDInputError(label, f"'{path.name}' holds no table of tensors")
    check_weights(data, label, path.name)
    return data


def _folder_weights(folder: Path, label: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise STDInputError(label, f"'{folder}' has no .safetensors weights (a diffusers MotionAdapter folder holds "
                                   "config.json and diffusion_pytorch_model.safetensors)")
    out = {}
    for f in files:
        weights = read_safetensors(f, label)[0]
        check_weights(weights, label, f.name)
        out.update(weights)
    return out


def load_motion_adapter(spec: str, models_dir: Path | None = None, like_unet=None, seed: int = 0,
                        label: str = "motion_module") -> MotionModule:
    """A motion module as a diffusers ``MotionAdapter`` (see the module docstring); ``like_unet`` gives the widths
    of ``tiny``."""
    from diffusers import MotionAdapter

    spec = str(spec or "").strip()
    if not spec:
        raise STDInputError(label, "give a motion module (a file in models/animatediff_models, a path, a diffusers "
                                   "MotionAdapter folder, or 'tiny')")
    if spec == "tiny":
        widths = tuple(like_unet.config.block_out_channels) if like_unet is not None else (16, 16, 32, 32)
        layers = like_unet.config.layers_per_block if like_unet is not None else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = MotionAdapter(block_out_channels=widths, **dict(TINY_MOTION, motion_layers_per_block=layers))
        sd, info = to_diffusers(adapter.state_dict())
        return MotionModule(adapter, info, "tiny")
    path = resolve("motion_module", spec, models_dir).path
    if path is None:
        raise STDInputError(label, f"'{spec}' is not a local file or folder; motion modules are read offline")
    raw = _folder_weights(path, label) if path.is_dir() else read_weights(path, label)
    sd, info = to_diffusers(raw)
    config = adapter_config(info, sd)
    with torch.device("meta"):
        adapter = MotionAdapter(**config)
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"lacks {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            what.append(f"has {len(unexpected)} it cannot place (e.g. {unexpected[0]})")
        raise STDInputError(label, f"'{path.name}' ({info.label()}) {' and '.join(what)}: a truncated or foreign "
                                   "file")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise STDInputError(label, f"'{path.name}': {len(bad)} tensors have unexpected shapes (e.g. {bad[0]} "
                                   f"{list(sd[bad[0]].shape)} vs {list(expected[bad[0]].shape)})")
    adapter.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return MotionModule(adapter, info, path.name, path)


def motion_unet(unet, module: MotionModule):
    """``UNetMotionModel`` of a 2-D UNet with the module inserted (the UNet's weights copied)."""
    from diffusers import UNetMotionModel
    from diffusers.models.modeling_utils import no_init_weights

    try:
        with no_init_weights():  # every weight is copied from the UNet and the adapter: no random init first
            model = UNetMotionModel.from_unet2d(unet, module.adapter)
    except (RuntimeError, ValueError, KeyError, AttributeError) as err:
        raise STDInputError("motion_module", f"'{module.name}' ({module.info.label()}) does not fit this base "
                                             f"model ({first_line(err)})") from None
    return torch.nn.Module.to(model, unet.dtype)  # plain cast (diffusers' own to() warns about fp32 modules)


def motion_linear_shapes(model) -> dict[str, tuple[int, int]]:
    """{diffusers module path: (out, in)} of every linear layer inside the motion modules of a motion model."""
    out = {}
    for name, mod in model.named_modules():
        if "motion_modules." in name and isinstance(mod, torch.nn.Linear):
            out[name] = (mod.out_features, mod.in_features)
    return out


def motion_lora(model, state_dict: dict, metadata: dict, name: str, module_label: str) -> dict[str, MotionLoraLayer]:
    """The motion layers of a v2v LoRA, checked to fit ``model``'s motion modules (refused otherwise)."""
    from comfyui_std.core.lora_format import peft_alpha_from_metadata

    shapes = motion_linear_shapes(model)
    layers = motion_lora_layers(state_dict, shapes, alpha=peft_alpha_from_metadata(metadata), name=name)
    check_motion_lora(layers, shapes, name, module_label)
    return layers


class FusedMotionLora:
    """A v2v LoRA's motion layers fused into a motion model's linear weights; :meth:`restore` puts the original
    weights back (exactly: they are kept, not subtracted)."""

    def __init__(self, model, layers: dict[str, MotionLoraLayer], strength: float = 1.0):
        modules = dict(model.named_modules())
        self._saved: dict[str, torch.Tensor] = {}
        try:
            for path, layer in layers.items():
                weight = modules[path].weight
                self._saved[path] = weight.detach().clone()
                with torch.no_grad():
                    weight.add_(layer.delta(strength).to(weight.device, weight.dtype))
        except BaseException:
            self.restore(model)
            raise
        self.count = len(layers)

    def restore(self, model) -> None:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for path, weight in self._saved.items():
                modules[path].weight.copy_(weight)
        self._saved = {}
