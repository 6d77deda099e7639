"""IP-Adapter files and their CLIP image encoders, as users have them (diffusers folders and ComfyUI single files).

The weights' structure and fit checks are the core's (:mod:`comfyui_std.core.style_blocks`), shared with the
ComfyUI nodes; here the files are read and the image encoder is built, strictly (every tensor counted).
"""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.style_blocks import (check_adapter_fits, check_image_embeds, ip_layer_order, nest_ip_adapter,
                                           parse_ip_adapter)

from .files import WHAT, read_safetensors
from .weights import TensorSource, build_on_meta, check, folder_weights, materialize

#: (hidden width, layers) of known CLIP vision towers -> (attention heads, activation)
CLIP_VISION_KNOWN = {(1280, 32): (16, "gelu"), (1664, 48): (16, "gelu"), (1024, 24): (16, "quick_gelu"),
                     (768, 12): (12, "quick_gelu")}


def clip_vision_config(shapes: dict) -> dict:
    """A transformers ``CLIPVisionConfig`` for a single-file CLIP vision tower (the ComfyUI ``clip_vision`` files),
    read from its tensor shapes; heads and activation come from :data:`CLIP_VISION_KNOWN` (else width // 64, gelu)."""
    pre = "vision_model."
    hidden = int(shapes[pre + "embeddings.class_embedding"][0])
    patch = int(shapes[pre + "embeddings.patch_embedding.weight"][-1])
    positions = int(shapes[pre + "embeddings.position_embedding.weight"][0])
    layers = len({k.split(".")[3] for k in shapes if k.startswith(pre + "encoder.layers.")})
    heads, act = CLIP_VISION_KNOWN.get((hidden, layers), (max(1, hidden // 64), "gelu"))
    return {"hidden_size": hidden, "patch_size": patch, "image_size": int(round((positions - 1) ** 0.5)) * patch,
            "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": act,
            "intermediate_size": int(shapes[pre + "encoder.layers.0.mlp.fc1.weight"][0]),
            "projection_dim": int(shapes["visual_projection.weight"][0]), "layer_norm_eps": 1e-5}


def load_image_encoder(path: Path, dtype: torch.dtype = torch.float32):
    """A ``CLIPVisionModelWithProjection`` from a transformers folder or a single .safetensors file, every tensor
    loaded and counted (a missing or extra tensor is an error naming it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path).expanduser()
    if not path.exists():
        raise STDInputError("image encoder", f"'{path}' does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise STDInputError("image encoder", f"{path} is a folder without config.json")
        config = CLIPVisionConfig.from_pretrained(str(path))
        source = TensorSource(folder_weights(path, "image encoder"), "image encoder")
    else:
        if path.suffix != ".safetensors":
            raise STDInputError("image encoder", f"'{path.name}': only .safetensors files are read")
        source = TensorSource([path], "image encoder")
        shapes = source.shapes()
        if "visual_projection.weight" not in shapes or "vision_model.embeddings.class_embedding" not in shapes:
            example = WHAT["image_encoder"].split("e.g. ")[1]
            raise STDInputError("image encoder", f"'{path.name}' is not a CLIP vision model with projection in "
                                                 f"transformers format; use e.g. {example}")
        config = CLIPVisionConfig(**clip_vision_config(shapes))
    model = build_on_meta(lambda: CLIPVisionModelWithProjection(config))
    mapping = {k: (k, None) for k in model.state_dict()}
    report = check(model, mapping, source, "image encoder", set(source.keys()),
                   {"position_ids": "fixed position index buffer"})
    return materialize(model, mapping, source, dtype, report)  # refuses a short or foreign file, naming tensors


def read_ip_adapter(path: Path) -> dict:
    """The IP-Adapter state dict in diffusers' nested layout ``{"image_proj": ..., "ip_adapter": ...}``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        flat, _ = read_safetensors(path, "IP-Adapter")
    elif path.suffix == ".bin":
        try:
            flat = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with anything but tensors is refused by weights_only
            raise STDInputError("IP-Adapter", f"'{path.name}' is not a readable weights file ({type(err).__name__}); "
                                              "use the .safetensors version") from None
    else:
        raise STDInputError("IP-Adapter", f"'{path.name}': use a .safetensors IP-Adapter file")
    return _named(path, nest_ip_adapter, flat)


def _named(path: Path, fn, *args):
    """``fn(*args)`` with a core ``ipadapter`` error reworded to name the file."""
    try:
        return fn(*args)
    except STDInputError as err:
        raise STDInputError("IP-Adapter", f"'{path.name}': {str(err).split(': ', 1)[1]}") from None


def cross_attention_widths(unet) -> list[int]:
    """The inner width of every cross-attention layer of a diffusers UNet, in the order IP-Adapter files number
    them (:func:`~comfyui_std.core.style_blocks.ip_layer_order`)."""
    attn2 = [n[: -len(".processor")] for n in unet.attn_processors
             if n.endswith("attn2.processor") and "motion_modules" not in n]  # temporal attn2 is self-attention
    return [unet.get_submodule(n).to_k.out_features for n in ip_layer_order(attn2)]


def prepare_style_adapter(unet, adapter_path: Path, encoder_path: Path, label: str,
                          dtype: torch.dtype = torch.float32):
    """Read an IP-Adapter and its image encoder and check that they fit ``unet`` and each other, before anything is
    attached: ``(nested state dict, parsed weights, image encoder)``.

    Refused with a message naming the file: Plus/FaceID or corrupt adapters, an adapter made for another base model
    (cross-attention width or layer count; ``label`` names the base in the message), an encoder whose embeddings
    are not the adapter's width, an encoder file with missing or foreign tensors. Used by the app (which then loads
    the adapter through diffusers' pipeline) and the trainer's teacher, so both accept and refuse the same files.
    """
    adapter_path, encoder_path = Path(adapter_path).expanduser(), Path(encoder_path).expanduser()
    nested = read_ip_adapter(adapter_path)
    weights = _named(adapter_path, parse_ip_adapter, nested)
    check_adapter_fits(weights, int(unet.config.cross_attention_dim), cross_attention_widths(unet), label)
    encoder = load_image_encoder(encoder_path, dtype)
    encoder.requires_grad_(False)
    check_image_embeds(weights, torch.zeros(1, int(encoder.config.projection_dim)))
    return nested, weights, encoder


# --------------------------------------------------------------------------------------------------------------------
# Style images -> CLIP image embeddings

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """An image ``[H, W, 3]`` float in 0..1 as CLIP input ``[1, 3, size, size]``: the short side scaled to ``size``
    (bicubic, antialiased), the center cropped, levels rounded to 8 bits, CLIP's mean and std. This is the
    preprocessing of ComfyUI's CLIP vision encode (``crop=True``), so a style image gives the same embeddings in the
    nodes, the app and the trainer."""
    import torch.nn.functional as F

    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got {tuple(rgb.shape)}")
    x = rgb.float().permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        x = F.interpolate(x, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = (x * 255.0).clamp(0, 255).round() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@torch.no_grad()
def image_embeds(encoder, rgb: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings ``[1, projection_dim]`` (float32) of a style image ``[H, W, 3]`` in 0..1 (see
    :func:`clip_pixels`), computed on the encoder's device and dtype."""
    param = next(encoder.parameters())
    pixels = clip_pixels(rgb, int(encoder.config.image_size)).to(param.device, param.dtype)
    return encoder(pixel_values=pixels).image_embeds.float()
