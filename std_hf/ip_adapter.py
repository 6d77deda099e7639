"""IP-Adapter files and their CLIP image encoders, as users have them (diffusers folders and ComfyUI single files).

The weights' structure and fit checks are the core's (:mod:`comfyui_std.core.style_blocks`), shared with the
ComfyUI nodes; here the files are read and the image encoder is built, strictly (every tensor counted).
"""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError

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
    if not report.ok:
        found = report.problems()
        raise STDInputError("image encoder", f"'{path.name}': {'; '.join(found[:3])}"
                                             f"{f' (and {len(found) - 3} more)' if len(found) > 3 else ''}")
    return materialize(model, mapping, source, dtype, report)


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
    nested: dict = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        if isinstance(v, dict) and k in nested:
            nested[k].update(v)
        elif "." in k and k.split(".", 1)[0] in nested:
            head, rest = k.split(".", 1)
            nested[head][rest] = v
    return nested
