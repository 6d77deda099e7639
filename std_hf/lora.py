"""LoRA files on diffusers modules: read them, check that they fit, get their per-layer factors, merge them.

Layer names come in the forms :func:`comfyui_std.core.lora_format.to_kohya` unifies (kohya ``lora_unet_*`` /
``lora_te*_*``, diffusers/PEFT ``unet.*.lora_A/B``, old diffusers ``.lora.down/up``). kohya files for SDXL name UNet
layers in the LDM layout (``lora_unet_input_blocks_4_1_...``); they are mapped through :mod:`std_hf.ldm`, so SD1.5
and SDXL style LoRAs from kohya, OneTrainer, Civitai and diffusers all resolve to the same modules.

A layer ``W x`` with LoRA factors ``down`` (rank r) and ``up`` becomes ``W x + s · up(down(x))`` with
``s = scale · alpha / r``. :class:`LoraLayer` holds one layer's factors with ``s`` folded into ``up``, so several
LoRAs on the same layer add up by concatenating along the rank (a sum of LoRAs is exactly a LoRA of the summed
rank), which is how the trainer exports base + style + STD delta as one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.lora_format import is_motion_key, peft_alpha_from_metadata, std_metadata, to_kohya

from . import ldm
from .files import read_safetensors

_LORA_TAIL = (".lora_down.weight", ".lora_up.weight", ".alpha")
#: kohya prefixes of the text encoders -> index in Base.text_encoders
TEXT_PREFIXES = {"lora_te_": 0, "lora_te1_": 0, "lora_te2_": 1}


@dataclass
class LoraLayer:
    """One layer's LoRA factors with the strength folded into ``up``: delta W = up @ down (convs: per kernel tap)."""

    down: torch.Tensor   # [r, in] or [r, in, kh, kw]
    up: torch.Tensor     # [out, r] or [out, r, 1, 1]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        down, up = self.down.float(), self.up.float()
        if down.ndim == 4:
            return torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return up @ down

    def concat(self, other: "LoraLayer") -> "LoraLayer":
        if self.down.shape[1:] != other.down.shape[1:] or self.up.shape[0] != other.up.shape[0]:
            raise ValueError(f"factor shapes {tuple(self.down.shape)} and {tuple(other.down.shape)} differ")
        return LoraLayer(torch.cat([self.down.float(), other.down.float()]),
                         torch.cat([self.up.float(), other.up.float()], dim=1))


def read_lora(path: str | Path, label: str = "lora") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a LoRA .safetensors file, with clear errors for missing or corrupt files and for
    tensors that cannot be applied (:func:`~comfyui_std.core.lora_format.check_lora_tensors`)."""
    from comfyui_std.core.lora_format import check_lora_tensors

    tensors, metadata = read_safetensors(Path(path), label)
    try:
        check_lora_tensors(tensors, f"'{Path(path).name}'")
    except ValueError as err:
        raise STDInputError(label, str(err)) from None
    return tensors, metadata


def module_index(model: torch.nn.Module) -> dict[str, str]:
    """{kohya-style name (``down_blocks_0_..._to_q``): module path} of every Linear/Conv layer (PEFT-wrapped layers
    by their own name)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name and \
                not name.endswith((".lora_A", ".lora_B")):
            name = name.removesuffix(".base_layer")
            out[name.replace(".", "_")] = name
    return out


def text_module_index(encoder: torch.nn.Module) -> dict[str, str]:
    """Like :func:`module_index` for a CLIP text tower, under the names LoRA files use (``text_model_encoder_...``),
    whether or not the transformers version nests the modules under ``text_model``."""
    out = {}
    for short, path in module_index(encoder).items():
        canonical = path if path.startswith(("text_model.", "text_projection")) else "text_model." + path
        out[canonical.replace(".", "_")] = path
    return out


def ldm_module_index(unet) -> dict[str, str]:
    """{kohya-style LDM name (``input_blocks_4_1_proj_in``): diffusers module path} of a UNet2DConditionModel."""
    config = dict(unet.config)
    if "down_block_types" not in config:
        return {}
    index = module_index(unet)
    keys = [path + ".weight" for path in index.values()]
    try:
        pairs = ldm.unet_key_map(config, keys)
    except ldm.LayoutError:
        return {}
    return {v[: -len(".weight")].replace(".", "_"): k[: -len(".weight")] for k, v in pairs.items()}


def _kohya(state_dict: dict, metadata: dict, label: str, name: str | None = None,
           motion_ok: bool = False) -> dict[str, torch.Tensor]:
    kohya, motion = to_kohya(state_dict, alpha=peft_alpha_from_metadata(metadata))
    if motion and not motion_ok:
        raise STDInputError(label, f"{_subject(name)}holds {len(motion)} motion-module tensors (an AnimateDiff "
                                   "LoRA); a style LoRA has image layers only")
    odd = sorted({k.split(".", 1)[-1] for k in kohya if not k.endswith(_LORA_TAIL)})
    if odd:
        raise STDInputError(label, f"{_subject(name)}holds tensors of kind {', '.join(odd[:4])} (LyCORIS/LoHa/LoKr/"
                                   "DoRA or full diffs), which are not supported; use a plain LoRA (lora_down/lora_up)")
    return kohya


def lora_layers(unet, text_encoders: list, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                label: str, scale: float = 1.0, name: str | None = None, base_label: str = "this base model",
                motion_ok: bool = False) -> dict[tuple[str, str], LoraLayer]:
    """The factors of every layer of a LoRA file, keyed by (model, module path) with model ``unet``,
    ``text_encoder`` or ``text_encoder_2``.

    A layer that exists in no model, lacks a factor, or whose shape differs is an error naming the file (``name``),
    the base (``base_label``), how many layers do not fit, the first of them, and the base the file was made for
    (its ``std.base_model`` header, else a guess from its widths). Motion-module (AnimateDiff) tensors are refused
    unless ``motion_ok``, when they are left out. The app checks a LoRA with this before diffusers loads it
    (:func:`check_lora_fits`), the trainer merges style LoRAs with the factors.
    """
    kohya = _kohya(state_dict, metadata or {}, label, name, motion_ok)
    names = sorted({k.split(".")[0] for k in kohya if k.endswith((".lora_down.weight", ".lora_up.weight"))})
    if not names:
        raise STDInputError(label, f"{_subject(name)}holds no LoRA layers")
    unet_index, ldm_index = module_index(unet), None
    text_index = [text_module_index(t) for t in text_encoders]
    out: dict[tuple[str, str], LoraLayer] = {}
    problems = []
    for layer_name in names:
        target = None
        if layer_name.startswith("lora_unet_"):
            short = layer_name[len("lora_unet_"):]
            if short in unet_index:
                target = ("unet", unet_index[short])
            else:
                ldm_index = ldm_module_index(unet) if ldm_index is None else ldm_index
                if short in ldm_index:
                    target = ("unet", ldm_index[short])
        else:
            for pre, i in TEXT_PREFIXES.items():
                if layer_name.startswith(pre) and i < len(text_index) and layer_name[len(pre):] in text_index[i]:
                    target = ("text_encoder" if i == 0 else "text_encoder_2", text_index[i][layer_name[len(pre):]])
        if target is None:
            problems.append(f"{layer_name} does not exist in {base_label}")
            continue
        down, up = kohya.get(f"{layer_name}.lora_down.weight"), kohya.get(f"{layer_name}.lora_up.weight")
        if down is None or up is None:
            problems.append(f"{layer_name} lacks its lora_{'down' if down is None else 'up'} tensor")
            continue
        rank = int(down.shape[0])
        alpha = float(kohya[f"{layer_name}.alpha"]) if f"{layer_name}.alpha" in kohya else float(rank)
        module = (unet if target[0] == "unet" else text_encoders[0 if target[0] == "text_encoder" else 1])
        weight = module.get_submodule(target[1]).weight  # a PEFT-wrapped layer gives its base layer's weight
        d = down[:, :, None, None] if (down.ndim == 2 and weight.ndim == 4) else down
        u = up.reshape(up.shape[0], up.shape[1], 1, 1) if d.ndim == 4 else up
        shape = (int(u.shape[0]), *map(int, d.shape[1:]))
        if d.ndim != weight.ndim or u.ndim != d.ndim or shape != tuple(weight.shape) or u.shape[1] != d.shape[0]:
            problems.append(f"{layer_name} gives shape {shape} but the layer's weight is {tuple(weight.shape)}")
            continue
        out[target] = LoraLayer(d.float(), u.float() * (scale * alpha / rank))
    if problems:
        made_for = std_metadata(metadata).get("base_model")
        made_for = f"made for {made_for}" if made_for else f"probably made for {guess_lora_base(kohya)}"
        raise STDInputError(label, f"{_subject(name)}does not fit {base_label}: {len(problems)} of {len(names)} "
                                   f"layers do not match (e.g. {problems[0]}). It was {made_for}; use a LoRA made "
                                   "for your base model")
    return out


def _subject(name: str | None) -> str:
    return f"'{name}' " if name else ""


def check_lora_fits(unet, text_encoders: list, state_dict: dict[str, torch.Tensor], name: str,
                    metadata: dict[str, str] | None, base_label: str) -> list[str]:
    """Refuse a LoRA made for another base model (or of a kind diffusers would half-apply) before it is loaded:
    :func:`lora_layers` on the app's UNet and text encoders, the factors discarded. Returns the keys of its
    motion-module tensors (a v2v LoRA's), which an image model has no place for."""
    lora_layers(unet, text_encoders, state_dict, metadata, "lora", name=name,
                base_label=f"the loaded base model {base_label}", motion_ok=True)
    return sorted(k for k in state_dict if is_motion_key(k))


def guess_lora_base(kohya: dict[str, torch.Tensor]) -> str:
    widths = {int(v.shape[1]) for k, v in kohya.items() if k.endswith("attn2_to_k.lora_down.weight") and v.ndim == 2}
    for width, label in ((2048, "SDXL"), (768, "SD1.5"), (1024, "SD2.x")):
        if width in widths:
            return label
    return "another base model"


@torch.no_grad()
def merge_layers(models: dict[str, torch.nn.Module], layers: dict[tuple[str, str], LoraLayer]) -> int:
    """Add every layer's delta to its weight in place; returns the number of layers merged."""
    for (model, path), layer in layers.items():
        weight = models[model].get_submodule(path).weight
        delta = layer.delta()
        weight += delta.reshape(weight.shape).to(weight.dtype)
    return len(layers)
