"""An IP-Adapter style image for the STD teacher (the student learns the style without an image input)."""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError


class StyleReference:
    """An IP-Adapter on the preset's blocks (shared definition: ``comfyui_std.core.style_blocks``), fed with a style
    image. Only the teacher uses it: :meth:`set_scales` switches the adapter's per-layer scales between the preset
    (for teacher calls) and zero (for student and target calls), so the student learns the style without an image
    input. The adapter and image encoder are read and checked as the app does
    (:func:`std_hf.ip_adapter.prepare_style_adapter`; the encoder may be a transformers folder or a ComfyUI
    ``clip_vision`` single file), and the style image becomes the same embeddings as in the app and the nodes
    (:func:`std_hf.ip_adapter.image_embeds`, pixels converted like training images: 16-bit levels kept, EXIF
    orientation applied, transparency on white).
    """

    def __init__(self, base, ip_adapter: str, image_encoder: str, style_image: str, preset: str = "style",
                 weight: float = 1.0):
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        from comfyui_std.core.style_blocks import diffusers_ip_scale
        from std_hf.ip_adapter import image_embeds, prepare_style_adapter
        from training.common.data import read_image

        for name, p in (("ip_adapter", ip_adapter), ("image_encoder", image_encoder), ("style_image", style_image)):
            if not Path(p).expanduser().exists():
                raise STDInputError(name, f"{p} does not exist")
        unet = base.unet
        nested, _, encoder = prepare_style_adapter(unet, Path(ip_adapter), Path(image_encoder), base.name)
        try:
            rgb = read_image(Path(style_image).expanduser(), "style_image")
        except STDInputError:
            raise
        except Exception as err:  # PIL raises many types for unreadable images
            raise STDInputError("style_image", f"{style_image} is not a readable image ({type(err).__name__})") \
                from None
        # the encoder's only use: it is freed here (a ViT-H is 2.35 GiB in fp32), never moved to the GPU
        self.embeds = image_embeds(encoder, rgb)  # [1, D]
        del encoder
        unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
        self.unet = unet
        (config,) = _maybe_expand_lora_scales(unet, [diffusers_ip_scale(preset, base.arch, weight)], default_scale=0.0)
        self.preset_scales = {}
        for name, proc in unet.attn_processors.items():
            if hasattr(proc, "scale") and isinstance(proc.scale, list):
                s = config
                if isinstance(config, dict):
                    s = 0.0
                    for k, v in config.items():
                        if name.startswith(k):
                            s = v
                self.preset_scales[name] = float(s)
        self.set_scales(False)

    def set_scales(self, teacher: bool) -> None:
        for name, proc in self.unet.attn_processors.items():
            if name in self.preset_scales:
                proc.scale = [self.preset_scales[name] if teacher else 0.0]

    def added_cond(self, batch: int, uncond: bool, device, dtype=torch.float32) -> dict:
        e = torch.zeros_like(self.embeds) if uncond else self.embeds
        return {"image_embeds": [e.to(device, dtype).expand(batch, -1)[:, None]]}
