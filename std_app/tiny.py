"""The tiny offline model zoo, written to disk as a ComfyUI-style ``models`` folder.

``python gradio_app.py --tiny`` and the tests use it: the app then loads it through exactly the code that loads
real files (diffusers folder, STD LoRA zoo with ``std.*`` metadata, single-file IP-Adapter and CLIP image encoder).
The models come from the one tiny builder, :mod:`std_hf.tiny` (the block layouts of SD1.5 and SDXL, so the
style-block presets select real blocks). Nothing is downloaded; building takes a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from comfyui_std.core.lora_format import encode_std_metadata
from comfyui_std.core.style_blocks import ip_layer_order

ARCHITECTURES = ("sd15", "sdxl")
ZOO_ETAS = (0.65, 0.75, 0.85, 0.95)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=32,
                   patch_size=8, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TINY_FILES = {"ip_adapter": "ip-adapter_tiny.safetensors", "image_encoder": "tiny_clip_vision.safetensors"}


def base_name(arch: str) -> str:
    return f"tiny-{arch}"


def build_pipeline(arch: str):
    """A tiny diffusers pipeline of the given architecture: the trainers' tiny base (:func:`std_hf.base.tiny_base`,
    random weights, seed 0) in the container the app loads (:func:`std_hf.base.as_pipeline`)."""
    from std_hf.base import as_pipeline, tiny_base

    return as_pipeline(tiny_base(arch, seed=0))


def write_lora(unet, path: Path, eta: float | None, kind: str, base: str, rank: int = 4, seed: int = 0,
               method: str = "std", motion_unet=None) -> Path:
    """A PEFT-format (``unet.<module>.lora_A/B.weight``) STD LoRA on the attention projections, with the ``std.*``
    header the trainer writes; with ``motion_unet`` (a v2v LoRA, as the released ones) also on the attention
    projections of its motion modules, named by diffusers' motion-model paths."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for model in (unet, motion_unet):
        for name, module in (model.named_modules() if model is not None else ()):
            if model is motion_unet and "motion_modules." not in name:
                continue
            if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS) and ".attn" in name:
                sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
                sd[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    values = {"method": method, "start_strength": eta, "kind": kind, "base_model": base, "rank": rank, "alpha": rank}
    if method == "sid_lsg":
        values.update(t_init=625, nfe=1)
    meta = encode_std_metadata(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return path


def tiny_motion_unet(unet):
    """The zoo's UNet with the ``tiny`` motion module inserted (what ``--motion-module tiny`` runs)."""
    from std_hf.motion import load_motion_adapter, motion_unet

    return motion_unet(unet, load_motion_adapter("tiny", like_unet=unet))


def write_ip_adapter(unet, path: Path, tokens: int = 4, seed: int = 0) -> Path:
    """A standard-layout IP-Adapter file (``image_proj.*`` + ``ip_adapter.{2k+1}.to_k_ip/to_v_ip``) for ``unet``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    attn2 = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    sd = {"image_proj.proj.weight": torch.randn(tokens * cross, CLIP_VISION["projection_dim"], generator=g) * 0.2,
          "image_proj.proj.bias": torch.zeros(tokens * cross),
          "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for k, name in enumerate(ip_layer_order(attn2)):
        inner = unet.get_submodule(name).to_k.out_features
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = torch.randn(inner, cross, generator=g) * 0.2
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = torch.randn(inner, cross, generator=g) * 0.2
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_image_encoder(path: Path) -> Path:
    """A single-file CLIP vision tower with projection (transformers keys), like ComfyUI's clip_vision files."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def build_tiny_models(root: Path, arch: str = "sd15") -> Path:
    """Write a tiny model zoo under ``root`` laid out like ComfyUI's ``models`` folder and return ``root``:

    * ``diffusers/tiny-<arch>/``: the base pipeline (diffusers folder);
    * ``loras/std_tiny_{i2i,v2v}_eta{0.65,0.75,0.85,0.95}.safetensors``: the STD LoRA zoo (the v2v ones also carry
      motion layers that fit the ``tiny`` motion module, as the released v2v LoRAs carry theirs);
    * ``loras/sid_lsg_tiny_onestep.safetensors``: a SiD-LSG one-step generator LoRA (method and t_init metadata);
    * ``ipadapter/ip-adapter_tiny.safetensors`` and ``clip_vision/tiny_clip_vision.safetensors``.

    Files already there are reused.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny architecture must be one of {ARCHITECTURES}, got {arch!r}")
    root = Path(root)
    base = root / "diffusers" / base_name(arch)
    if not (base / "model_index.json").exists():
        build_pipeline(arch).save_pretrained(str(base))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    motion = None
    for i, eta in enumerate(ZOO_ETAS):
        for kind in ("i2i", "v2v"):
            path = root / "loras" / f"std_tiny_{kind}_eta{eta:.2f}.safetensors"
            if not path.exists():
                if kind == "v2v" and motion is None:
                    motion = tiny_motion_unet(unet)
                write_lora(unet, path, eta, kind, base_name(arch), seed=i * 2 + (kind == "v2v"),
                           motion_unet=motion if kind == "v2v" else None)
    onestep = root / "loras" / "sid_lsg_tiny_onestep.safetensors"
    if not onestep.exists():
        write_lora(unet, onestep, None, "onestep", base_name(arch), seed=99, method="sid_lsg")
    adapter, encoder = root / "ipadapter" / TINY_FILES["ip_adapter"], root / "clip_vision" / TINY_FILES["image_encoder"]
    if not adapter.exists():
        write_ip_adapter(unet, adapter)
    if not encoder.exists():
        write_image_encoder(encoder)
    return root

