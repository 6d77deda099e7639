"""An IP-Adapter style image for the STD teacher (the student learns the style without an image input)."""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class StyleReference:
    """An IP-Adapter on the preset's blocks (shared definition: ``comfyui_std.core.style_blocks``), fed with a style
    image. Only the teacher uses it: :meth:`set_scales` switches the adapter's per-layer scales between the preset
    (for teacher calls) and zero (for student and target calls), so the student learns the style without an image
    input. The image encoder may be a transformers folder or a ComfyUI ``clip_vision`` single file.
    """

    def __init__(self, base, ip_adapter: str, image_encoder: str, style_image: str, preset: str = "style",
                 weight: float = 1.0):
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        from comfyui_std.core.style_blocks import check_adapter_fits, diffusers_ip_scale, ip_layer_order, \
            parse_ip_adapter
        from std_hf.ip_adapter import load_image_encoder, read_ip_adapter

        for name, p in (("ip_adapter", ip_adapter), ("image_encoder", image_encoder), ("style_image", style_image)):
            if not Path(p).expanduser().exists():
                raise STDInputError(name, f"{p} does not exist")
        nested = read_ip_adapter(Path(ip_adapter).expanduser())
        weights = parse_ip_adapter(nested)  # clear errors for Plus/FaceID/corrupt files
        unet = base.unet
        attn2 = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
        inner = [unet.get_submodule(n).to_k.out_features for n in ip_layer_order(attn2)]
        check_adapter_fits(weights, int(unet.config.cross_attention_dim), inner, base.name)
        self.encoder = load_image_encoder(Path(image_encoder).expanduser())
        self.encoder.requires_grad_(False)
        embeds = self._embed(style_image)
        if embeds.shape[-1] != weights.clip_dim:
            raise STDInputError("image_encoder", f"it gives image embeddings of width {embeds.shape[-1]} but the "
                                                 f"IP-Adapter expects {weights.clip_dim}")
        unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
        self.unet = unet
        self.embeds = embeds  # [1, D]
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

    @torch.no_grad()
    def _embed(self, path: str) -> torch.Tensor:
        import numpy as np
        import torch.nn.functional as F
        from PIL import Image

        try:
            with Image.open(Path(path).expanduser()) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except Exception as err:  # PIL raises many types for unreadable images
            raise STDInputError("style_image", f"{path} is not a readable image ({type(err).__name__})") from None
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        size = int(self.encoder.config.image_size)
        scale = size / min(x.shape[-2:])
        x = F.interpolate(x, size=(max(size, round(x.shape[-2] * scale)), max(size, round(x.shape[-1] * scale))),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
        x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return self.encoder(pixel_values=x).image_embeds.float()

    def set_scales(self, teacher: bool) -> None:
        for name, proc in self.unet.attn_processors.items():
            if name in self.preset_scales:
                proc.scale = [self.preset_scales[name] if teacher else 0.0]

    def added_cond(self, batch: int, uncond: bool, device, dtype=torch.float32) -> dict:
        e = torch.zeros_like(self.embeds) if uncond else self.embeds
        return {"image_embeds": [e.to(device, dtype).expand(batch, -1)[:, None]]}
