"""Style-reference conditioning: which cross-attention layers an IP-Adapter feeds, and the adapter's weights.

One definition serves every front end:

* the ComfyUI nodes resolve a preset to attention-patch keys ``(block, number, transformer_index)``;
* diffusers callers (the Gradio app) pass :func:`diffusers_ip_scale` to ``pipe.set_ip_adapter_scale``;
* both select the same layers because both go through :func:`selects` on diffusers module names.

Presets (InstantStyle, arXiv 2404.02733; its SD1.5 recipe for the SD1.5 column):

==============  ===================================  =============================================
preset          SDXL (diffusers names)               SD1.5 (diffusers names)
==============  ===================================  =============================================
style           ``up_blocks.0.attentions.1``         ``up_blocks.1`` (all three attentions)
layout          ``down_blocks.2.attentions.1``       ``down_blocks.2`` (both attentions)
style+layout    both of the above                    ``down_blocks.2``, ``mid_block``, ``up_blocks.1``
all blocks      every cross-attention layer          every cross-attention layer
==============  ===================================  =============================================

SDXL ``up_blocks.0.attentions.1`` is ComfyUI's ``output_blocks.1.1`` (patch keys ``("output", 1, 0..9)``) and
``down_blocks.2.attentions.1`` is ``input_blocks.8.1`` (``("input", 8, 0..9)``). SD1.5's ``up_blocks.0`` has no
attention at all, so the SDXL dictionary would silently switch the adapter off there; that is why the presets are per
architecture. STD's official inference uses the SDXL ``style`` preset with scale 1.0.

Pure torch: no ComfyUI, no diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import STDInputError
from .tensors import check_weights

PRESET_NAMES = ("style", "layout", "style+layout", "all blocks")
ARCHITECTURES = ("sdxl", "sd15")

_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "sdxl": {
        "style": ("up_blocks.0.attentions.1",),
        "layout": ("down_blocks.2.attentions.1",),
        "style+layout": ("down_blocks.2.attentions.1", "up_blocks.0.attentions.1"),
        "all blocks": ("",),
    },
    "sd15": {
        "style": ("up_blocks.1",),
        "layout": ("down_blocks.2",),
        "style+layout": ("down_blocks.2", "mid_block", "up_blocks.1"),
        "all blocks": ("",),
    },
}

# The same presets in the nested form diffusers' set_ip_adapter_scale takes (unlisted blocks get scale 0).
_DIFFUSERS_SCALE = {
    "sdxl": {
        "style": lambda w: {"up": {"block_0": [0.0, w, 0.0]}},
        "layout": lambda w: {"down": {"block_2": [0.0, w]}},
        "style+layout": lambda w: {"down": {"block_2": [0.0, w]}, "up": {"block_0": [0.0, w, 0.0]}},
        "all blocks": lambda w: w,
    },
    "sd15": {
        "style": lambda w: {"up": {"block_1": w}},
        "layout": lambda w: {"down": {"block_2": w}},
        "style+layout": lambda w: {"down": {"block_2": w}, "mid": w, "up": {"block_1": w}},
        "all blocks": lambda w: w,
    },
}


def check_preset(preset: str, architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise STDInputError("architecture", f"must be one of {ARCHITECTURES}, got {architecture!r}")
    if preset not in PRESET_NAMES:
        raise STDInputError("preset", f"must be one of {PRESET_NAMES}, got {preset!r}")


def architecture_for_context_dim(context_dim: int) -> str:
    """SDXL's UNet cross-attends to 2048-wide text features; SD1.5's to 768 (SD2.x: 1024, treated like SD1.5)."""
    return "sdxl" if int(context_dim) == 2048 else "sd15"


def target_blocks(preset: str, architecture: str) -> tuple[str, ...]:
    """The diffusers module-name prefixes a preset selects ("" selects everything)."""
    check_preset(preset, architecture)
    return _PRESETS[architecture][preset]


def selects(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a diffusers module name (e.g. ``up_blocks.0.attentions.1.transformer_blocks.3.attn2``) is selected."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def diffusers_ip_scale(preset: str, architecture: str, weight: float = 1.0):
    """The argument for diffusers' ``pipe.set_ip_adapter_scale`` that enables exactly the preset's layers."""
    check_preset(preset, architecture)
    return _DIFFUSERS_SCALE[architecture][preset](float(weight))


_ATTN2 = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
                    r"|^(mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")


def _order_key(name: str):
    m = _ATTN2.match(name)
    if m is None:
        raise ValueError(f"not a cross-attention module name: {name!r}")
    if m.group(1):
        section = 0 if m.group(1) == "down_blocks" else 1
        return section, int(m.group(2)), int(m.group(3)), int(m.group(4))
    return 2, 0, int(m.group(6)), int(m.group(7))


def ip_layer_order(attn2_names) -> list[str]:
    """Cross-attention module names in the order IP-Adapter files number them.

    IP-Adapter weights are keyed ``ip_adapter.{i}`` by the index of the attention processor in diffusers'
    ``unet.attn_processors`` (down blocks, then up blocks, then the mid block; attn1 and attn2 alternate), so the
    k-th cross-attention layer in this order is ``ip_adapter.{2k+1}``.
    """
    return sorted(attn2_names, key=_order_key)


def comfy_patch_key(comfy_name: str) -> tuple[str, int, int]:
    """ComfyUI attention-patch key for a ComfyUI UNet module name, e.g.
    ``output_blocks.1.1.transformer_blocks.3.attn2`` -> ``("output", 1, 3)``; the middle block is ``("middle", 0, i)``."""
    m = re.match(r"^(input|output)_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2", comfy_name)
    if m:
        return m.group(1), int(m.group(2)), int(m.group(3))
    m = re.match(r"^middle_block\.\d+\.transformer_blocks\.(\d+)\.attn2", comfy_name)
    if m:
        return "middle", 0, int(m.group(1))
    raise ValueError(f"not a ComfyUI cross-attention module name: {comfy_name!r}")


# --------------------------------------------------------------------------------------------------------------------
# IP-Adapter weights (the standard layout: image_proj = Linear + LayerNorm, ip_adapter.{i}.to_k_ip / to_v_ip)

@dataclass
class IPAdapterWeights:
    proj_weight: torch.Tensor      # [tokens * cross_dim, clip_dim]
    proj_bias: torch.Tensor        # [tokens * cross_dim]
    norm_weight: torch.Tensor      # [cross_dim]
    norm_bias: torch.Tensor        # [cross_dim]
    to_k: list[torch.Tensor]       # per cross-attention layer, [inner_dim, cross_dim], in ip_layer_order
    to_v: list[torch.Tensor]

    @property
    def cross_dim(self) -> int:
        return int(self.norm_weight.shape[0])

    @property
    def clip_dim(self) -> int:
        return int(self.proj_weight.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.proj_weight.shape[0]) // self.cross_dim

    @property
    def num_layers(self) -> int:
        return len(self.to_k)

    def describe(self) -> str:
        arch = {2048: "SDXL", 768: "SD1.5", 1024: "SD2.x"}.get(self.cross_dim, f"cross-attention width {self.cross_dim}")
        return (f"{arch} IP-Adapter, {self.num_layers} cross-attention layers, {self.tokens} image tokens, "
                f"image-embedding width {self.clip_dim}")

    def project(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [N, clip_dim] -> image prompt tokens [N, tokens, cross_dim]."""
        x = F.linear(image_embeds.to(self.proj_weight.dtype), self.proj_weight, self.proj_bias)
        x = x.reshape(image_embeds.shape[0], self.tokens, self.cross_dim)
        return F.layer_norm(x, (self.cross_dim,), self.norm_weight, self.norm_bias)


IP_ADAPTER_GROUPS = ("image_proj", "ip_adapter")


def nest_ip_adapter(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter state dict in the nested layout ``{"image_proj": {...}, "ip_adapter": {...}}`` that diffusers'
    loader and ComfyUI's IP-Adapter nodes take, from flat safetensors keys (``image_proj.proj.weight``) or the
    already nested ``.bin`` layout. A tensor outside the two groups is refused, not dropped."""
    if not isinstance(sd, dict):
        raise STDInputError("ipadapter", f"expected a state dict, got {type(sd).__name__}")
    nested: dict[str, dict[str, torch.Tensor]] = {g: {} for g in IP_ADAPTER_GROUPS}
    for k, v in sd.items():
        head, _, rest = str(k).partition(".")
        if isinstance(v, dict) and k in nested:
            nested[k].update(v)
        elif rest and head in nested:
            nested[head][rest] = v
        else:
            raise STDInputError("ipadapter", f"holds {k!r}, outside image_proj.* and ip_adapter.*: not a standard "
                                             "IP-Adapter file")
    check_weights(nested, "ipadapter")
    return nested


def _flatten(sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flatten(v).items()})
        else:
            out[k] = v
    return out


def parse_ip_adapter(sd: dict) -> IPAdapterWeights:
    """Validate and parse an IP-Adapter state dict (flat safetensors keys or the nested ``.bin`` layout)."""
    if not isinstance(sd, dict) or not sd:
        raise STDInputError("ipadapter", "the file holds no tensors")
    sd = _flatten(sd)
    if any(k.startswith("image_proj.latents") or k.startswith("image_proj.perceiver") for k in sd):
        raise STDInputError("ipadapter", "IP-Adapter Plus (resampler) files are not supported; use a standard "
                            "IP-Adapter such as ip-adapter_sdxl_vit-h.safetensors (the one STD uses)")
    if any(".to_k_lora." in k or k.startswith("image_proj.proj.0") for k in sd):
        raise STDInputError("ipadapter", "FaceID / full-face IP-Adapter files are not supported; use a standard "
                            "IP-Adapter such as ip-adapter_sdxl_vit-h.safetensors")
    need = ("image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias")
    missing = [k for k in need if k not in sd]
    if missing:
        raise STDInputError("ipadapter", f"not an IP-Adapter file (missing {', '.join(missing)}); expected the "
                            "standard image_proj + ip_adapter layout")
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$", k)] if m})
    if not layers:
        raise STDInputError("ipadapter", "not an IP-Adapter file (no ip_adapter.*.to_k_ip weights)")
    if layers != list(range(1, 2 * len(layers), 2)):
        raise STDInputError("ipadapter", f"unexpected ip_adapter layer numbering {layers[:6]}...; "
                            "expected 1, 3, 5, ... (one per cross-attention layer)")
    to_k, to_v = [], []
    for i in layers:
        kv = sd.get(f"ip_adapter.{i}.to_v_ip.weight")
        if kv is None:
            raise STDInputError("ipadapter", f"ip_adapter.{i}.to_v_ip.weight is missing (corrupt file?)")
        to_k.append(sd[f"ip_adapter.{i}.to_k_ip.weight"])
        to_v.append(kv)
    w = IPAdapterWeights(sd["image_proj.proj.weight"], sd["image_proj.proj.bias"], sd["image_proj.norm.weight"],
                         sd["image_proj.norm.bias"], to_k, to_v)
    if w.proj_weight.ndim != 2 or w.proj_weight.shape[0] % w.cross_dim:
        raise STDInputError("ipadapter", f"image_proj.proj.weight has shape {tuple(w.proj_weight.shape)}, which is "
                            f"not a multiple of the token width {w.cross_dim}")
    for i, (k, v) in enumerate(zip(to_k, to_v)):
        if k.ndim != 2 or k.shape[1] != w.cross_dim or v.shape != k.shape:
            raise STDInputError("ipadapter", f"ip_adapter.{2 * i + 1} has shapes {tuple(k.shape)}/{tuple(v.shape)}, "
                                f"expected [inner, {w.cross_dim}] for both")
    return w


def check_adapter_fits(w: IPAdapterWeights, context_dim: int, inner_dims: list[int], model_name: str) -> None:
    """Raise a clear error when an adapter was made for another base model."""
    model_arch = {2048: "SDXL", 768: "SD1.5", 1024: "SD2.x"}.get(int(context_dim), f"context width {context_dim}")
    if w.cross_dim != int(context_dim) or w.num_layers != len(inner_dims):
        raise STDInputError("ipadapter", f"this is an {w.describe()}, but {model_name} is {model_arch} with "
                            f"{len(inner_dims)} cross-attention layers of width {context_dim}: pick the IP-Adapter "
                            "made for your base model")
    for i, (k, inner) in enumerate(zip(w.to_k, inner_dims)):
        if int(k.shape[0]) != int(inner):
            raise STDInputError("ipadapter", f"layer ip_adapter.{2 * i + 1} projects to {k.shape[0]} but the model's "
                                f"cross-attention there is {inner} wide: the adapter is for another base model")


def check_image_embeds(w: IPAdapterWeights, image_embeds: torch.Tensor) -> None:
    if image_embeds.ndim != 2 or image_embeds.shape[-1] != w.clip_dim:
        width = image_embeds.shape[-1] if image_embeds.ndim else "?"
        raise STDInputError("clip_vision", f"the CLIP vision model gives image embeddings of width {width} but this "
                            f"IP-Adapter expects {w.clip_dim} (ViT-H/14 adapters need CLIP-ViT-H-14, 1024; "
                            "ViT-bigG adapters need CLIP-ViT-bigG-14, 1280)")


def image_prompt_tokens(w: IPAdapterWeights, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image-prompt tokens [1, tokens, cross_dim]: several style images are averaged in embedding
    space; the unconditional tokens are the projection of a zero embedding, as IP-Adapter was trained."""
    check_image_embeds(w, image_embeds)
    mean = image_embeds.float().mean(dim=0, keepdim=True)
    with torch.no_grad():
        cond = w.project(mean)
        uncond = w.project(torch.zeros_like(mean))
    return cond, uncond
