"""Base models for the trainers: load SD1.5 / SDXL as users have them, or build tiny random ones for CPU runs.

``load_base(spec)`` accepts
  * ``tiny``: a tiny random SD1.5-shaped model built in-process (the UNet has the block layout of the tests' tiny
    ComfyUI checkpoint, so a LoRA trained on it applies there key for key);
  * a diffusers folder (``model_index.json``);
  * a single-file ``.safetensors`` checkpoint as ComfyUI keeps them: SD1.5 is converted offline (UNet and VAE with
    diffusers' converters, CLIP by prefix; the tokenizer comes from ``tokenizer=`` or the Hugging Face cache), SDXL
    through diffusers' ``from_single_file`` (which may fetch configs from the Hub once);
  * a Hugging Face Hub id (downloaded with diffusers' progress bars).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_std.core.schedules import DiscreteSchedule

# Tiny random SD1.5-shaped parts for CPU smoke runs (three attention levels, like the tests' tiny ComfyUI model).
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 32),
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=64)
TINY_CLIP = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, projection_dim=32)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass
class Base:
    """The pieces of a text-to-image model the trainers need."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    arch: str                                   # "sd15" or "sdxl"
    schedule: DiscreteSchedule
    name: str
    vae_scale: float = 0.18215
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def cond_dim(self) -> int:
        """Width of the pooled text embedding (what the discriminator is conditioned on)."""
        enc = self.text_encoders[-1]
        return int(getattr(enc.config, "projection_dim", None) or enc.config.hidden_size) if self.arch == "sdxl" \
            else int(enc.config.hidden_size)

    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (a posterior sample with ``generator``, else the mean)."""
        out = self.vae.encode(pixels)
        dist = getattr(out, "latent_dist", None)
        if dist is None:  # AutoencoderTiny (TAESD): deterministic
            z = out.latents
        elif generator is None:
            z = dist.mean
        else:
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        return z.float() * self.vae_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / self.vae_scale).to(dtype)).sample.float()

    def to(self, device, dtype=None, vae_dtype=None):
        self.unet.to(device, dtype=dtype)
        self.vae.to(device, dtype=vae_dtype or dtype)
        for t in self.text_encoders:
            t.to(device, dtype=dtype)
        return self


# -- tokenizer files ---------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """A byte-level CLIP tokenizer (no merges) that needs no download: every byte is a token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


# -- builders ----------------------------------------------------------------------------------------------------

def build_tiny(seed: int = 0) -> Base:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tempfile.mkdtemp(prefix="std-tok-"))))
    return Base(unet, vae, [text], [tok], "sd15", DiscreteSchedule(), "tiny", vae_scale=1.0)


def _schedule_from(folder: Path) -> DiscreteSchedule:
    cfg = folder / "scheduler" / "scheduler_config.json"
    return DiscreteSchedule.from_config(json.loads(cfg.read_text())) if cfg.exists() else DiscreteSchedule()


def load_diffusers_folder(folder: Path) -> Base:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    info = json.loads((folder / "model_index.json").read_text())
    sdxl = "text_encoder_2" in info and info.get("text_encoder_2") not in (None, [None, None])
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    encs = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
    toks = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
    if sdxl:
        encs.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
        toks.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    return Base(unet, vae, encs, toks, "sdxl" if sdxl else "sd15", _schedule_from(folder), folder.name,
                vae_scale=float(vae.config.scaling_factor))


def _ldm_unet_config(sd: dict) -> dict:
    """diffusers UNet config of an SD1.5-family LDM UNet from its weight shapes."""
    p = "model.diffusion_model."
    ch = sd[p + "input_blocks.0.0.weight"].shape[0]
    levels, res_per_level, attn = [], {}, set()
    for k in sd:
        if k.startswith(p + "input_blocks.") and k.endswith(".in_layers.2.weight"):
            i = int(k[len(p + "input_blocks."):].split(".")[0])
            levels.append((i, sd[k].shape[0]))
        if k.startswith(p + "input_blocks.") and ".transformer_blocks.0.attn2.to_k.weight" in k:
            attn.add(int(k[len(p + "input_blocks."):].split(".")[0]))
    levels.sort()
    # group consecutive res blocks into levels by the downsample blocks between them
    downs = sorted(int(k[len(p + "input_blocks."):].split(".")[0]) for k in sd
                   if k.startswith(p + "input_blocks.") and k.endswith(".op.weight"))
    bounds = downs + [10**9]
    mult, block_types, lvl = [], [], 0
    for i, width in levels:
        while i > bounds[lvl]:
            lvl += 1
        if len(mult) <= lvl:
            mult.append(width)
            block_types.append("CrossAttnDownBlock2D" if i in attn else "DownBlock2D")
        res_per_level[lvl] = res_per_level.get(lvl, 0) + 1
    ctx = sd[next(k for k in sd if k.endswith("attn2.to_k.weight"))].shape[1]
    up_types = tuple("CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(block_types))
    return dict(sample_size=64, in_channels=sd[p + "input_blocks.0.0.weight"].shape[1],
                out_channels=sd[p + "out.2.weight"].shape[0], block_out_channels=tuple(mult),
                layers_per_block=res_per_level[0], down_block_types=tuple(block_types), up_block_types=up_types,
                cross_attention_dim=ctx, attention_head_dim=8, norm_num_groups=32 if ch % 32 == 0 else 8,
                use_linear_projection=sd[next(k for k in sd if k.endswith("proj_in.weight"))].ndim == 2)


def load_sd15_single_file(path: Path, tokenizer: str | None = None) -> Base:
    """An SD1.5-family single-file checkpoint (LDM keys, as ComfyUI saves them), converted offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd = load_file(str(path))
    cfg = _ldm_unet_config(sd)
    unet = UNet2DConditionModel(**cfg)
    missing, unexpected = unet.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg), strict=False)
    if missing:
        raise ValueError(f"base: {path.name}: the UNet could not be converted ({len(missing)} weights missing, "
                         f"e.g. {missing[0]})")
    if any(k.startswith("first_stage_model.encoder.") for k in sd):
        vae = AutoencoderKL(**SD15_VAE)
        vae_sd = convert_ldm_vae_checkpoint({k[len("first_stage_model."):]: v for k, v in sd.items()
                                             if k.startswith("first_stage_model.")}, vae.config)
        vae.load_state_dict(vae_sd)
        scale = 0.18215
    elif "first_stage_model.taesd_encoder.0.weight" in sd:  # TAESD saved in the checkpoint (ComfyUI layout)
        from diffusers import AutoencoderTiny
        vae = AutoencoderTiny()
        enc, dec = "first_stage_model.taesd_encoder.", "first_stage_model.taesd_decoder."
        mapped = {}
        for k, v in sd.items():
            if k.startswith(enc):
                mapped["encoder.layers." + k[len(enc):]] = v
            elif k.startswith(dec):  # ComfyUI's decoder starts with its Clamp module; diffusers' applies it inline
                i, rest = k[len(dec):].split(".", 1)
                mapped[f"decoder.layers.{int(i) - 1}.{rest}"] = v
        vae.load_state_dict(mapped)
        scale = 1.0
    else:
        raise ValueError(f"base: {path.name} holds no VAE (first_stage_model.*); use a checkpoint with its VAE")
    prefix = "cond_stage_model.transformer."
    te = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    layers = 1 + max(int(k.split(".")[3]) for k in te if k.startswith("text_model.encoder.layers."))
    hidden = te["text_model.embeddings.token_embedding.weight"].shape[1]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=te["text_model.embeddings.token_embedding.weight"].shape[0],
                                        hidden_size=hidden,
                                        intermediate_size=te["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                                        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                        max_position_embeddings=77, hidden_act="quick_gelu"))
    te.pop("text_model.embeddings.position_ids", None)
    text.load_state_dict(te, strict=False)
    try:
        tok = CLIPTokenizer.from_pretrained(tokenizer or "openai/clip-vit-large-patch14",
                                            local_files_only=tokenizer is None)
    except OSError:
        raise ModelNotFoundError("tokenizer: the CLIP tokenizer of SD1.5 is not in the Hugging Face cache; pass "
                                 "--tokenizer with a folder holding vocab.json and merges.txt (or run once online)")
    return Base(unet.to(torch.float32), vae, [text.to(torch.float32)], [tok], "sd15", DiscreteSchedule(), path.stem,
                vae_scale=scale)


def load_sdxl_single_file(path: Path) -> Base:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), torch_dtype=torch.float32)
    return Base(pipe.unet, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                "sdxl", DiscreteSchedule.from_config(pipe.scheduler.config), path.stem,
                vae_scale=float(pipe.vae.config.scaling_factor))


def load_base(spec: str, tokenizer: str | None = None, seed: int = 0) -> Base:
    """Load the base model named by ``spec`` (see module docstring); clear errors for missing files."""
    if spec == "tiny":
        return build_tiny(seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"base: {path} is a folder but not a diffusers model (no model_index.json)")
        return load_diffusers_folder(path)
    if path.suffix in (".safetensors", ".ckpt", ".pt"):
        if not path.exists():
            raise ModelNotFoundError(f"base: {path} does not exist; give a diffusers folder, a .safetensors "
                                     "checkpoint (e.g. ComfyUI/models/checkpoints/…) or a Hub id")
        if path.suffix != ".safetensors":
            raise ValueError(f"base: {path.name}: only .safetensors single files are read (pickles are unsafe)")
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception as err:
            raise ValueError(f"base: {path.name} is not a readable safetensors file ({err})") from None
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return load_sdxl_single_file(path)
        if any(k.startswith("model.diffusion_model.") for k in keys):
            return load_sd15_single_file(path, tokenizer)
        raise ValueError(f"base: {path.name} is not an SD1.5 or SDXL checkpoint (no model.diffusion_model.* keys)")
    if "/" in spec and not path.exists() and not spec.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        return load_diffusers_folder(Path(snapshot_download(spec, allow_patterns=["*.json", "*.txt", "*.safetensors"])))
    raise ModelNotFoundError(f"base: '{spec}' was not found: give 'tiny', a diffusers folder, a .safetensors "
                             "checkpoint or a Hugging Face Hub id")


# -- text conditioning -------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(base: Base, captions: list[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """prompt_embeds [B,77,C], pooled [B,P] (discriminator condition; SDXL text_embeds) and SDXL time_ids [B,6]."""
    device = next(base.text_encoders[0].parameters()).device
    hidden, pooled = [], None
    for tok, enc in zip(base.tokenizers, base.text_encoders):
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length if tok.model_max_length < 1000
                  else 77, truncation=True, return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        if base.arch == "sdxl":
            hidden.append(out.hidden_states[-2])
            pooled = out[0] if enc is base.text_encoders[-1] else pooled
        else:
            hidden.append(out.last_hidden_state)
            pooled = out.pooler_output
    result = {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}
    if base.arch == "sdxl":
        h, w = size
        result["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32,
                                          device=device).repeat(len(captions), 1)
    return result


def unet_kwargs(base: Base, ctx: dict[str, torch.Tensor]) -> dict:
    kw = {"encoder_hidden_states": ctx["prompt_embeds"]}
    if base.arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": ctx["pooled"], "time_ids": ctx["time_ids"]}
    return kw


# -- style LoRA merged into the teacher --------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(unet: torch.nn.Module, path: str, scale: float = 1.0) -> int:
    """Merge a LoRA file (kohya, diffusers/PEFT or old diffusers keys) into ``unet``'s weights; returns the number
    of layers merged. A LoRA for another base model is refused (no layer matches, or shapes differ)."""
    from safetensors.torch import load_file

    from comfyui_std.core.lora import lora_module_names, peft_alpha_from_metadata, to_kohya

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"style_lora: {p} does not exist")
    try:
        from safetensors import safe_open
        with safe_open(str(p), "pt") as f:
            metadata = f.metadata() or {}
        sd = load_file(str(p))
    except Exception as err:
        raise ValueError(f"style_lora: {p.name} is not a readable safetensors file ({err})") from None
    kohya, _ = to_kohya(sd, alpha=peft_alpha_from_metadata(metadata))
    modules = {name.replace(".", "_"): m for name, m in unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = [n for n in lora_module_names(kohya) if n.startswith("lora_unet_")]
    hits = [n for n in names if n[len("lora_unet_"):] in modules]
    if not names or not hits:
        raise ValueError(f"style_lora: none of the {len(names)} UNet layers of {p.name} exist in this base model; "
                         "it was probably made for another base (SD1.5 vs SDXL)")
    for n in hits:
        m = modules[n[len("lora_unet_"):]]
        down, up = kohya[f"{n}.lora_down.weight"].float(), kohya[f"{n}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(kohya.get(f"{n}.alpha", torch.tensor(float(rank))))
        if isinstance(m, torch.nn.Conv2d):
            delta = (up.flatten(1) @ down.flatten(1))
            if down.shape[2:] != (1, 1):  # 3x3 lora_down: apply the 1x1 up after it
                delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
            else:
                delta = delta.reshape(m.weight.shape[0], m.weight.shape[1], 1, 1)
        else:
            delta = up @ down
        if delta.shape != m.weight.shape:
            raise ValueError(f"style_lora: {p.name} layer {n} has shape {tuple(delta.shape)} but the base model's is "
                             f"{tuple(m.weight.shape)}: the LoRA is for another base model")
        m.weight += (scale * alpha / rank) * delta.to(m.weight.dtype)
    if len(hits) < len(names):
        log_missing = len(names) - len(hits)
        import logging
        logging.getLogger("training").warning("style_lora %s: %d of %d layers not found in the base model",
                                              p.name, log_missing, len(names))
    return len(hits)


# -- video: a motion module in teacher and student ---------------------------------------------------------------

TINY_MOTION = dict(block_out_channels=(32, 32, 32), motion_layers_per_block=1, motion_transformer_layers_per_block=1,
                   motion_mid_block_layers_per_block=1, motion_num_attention_heads=2, motion_norm_num_groups=8,
                   motion_max_seq_length=32, use_motion_mid_block=False)


def attach_motion_adapter(unet: torch.nn.Module, spec: str) -> torch.nn.Module:
    """The UNet with a diffusers MotionAdapter (AnimateDiff) inserted: ``tiny`` (random), a folder or a Hub id."""
    from diffusers import MotionAdapter, UNetMotionModel

    if not spec:
        raise ValueError("motion_adapter: video mode needs a motion module (--motion-adapter: a diffusers "
                         "MotionAdapter folder such as guoyww/animatediff-motion-adapter-v1-5-3, or 'tiny')")
    if spec == "tiny":
        adapter = MotionAdapter(**TINY_MOTION)
    else:
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not path.exists():
            raise ModelNotFoundError(f"motion_adapter: {path} does not exist")
        adapter = MotionAdapter.from_pretrained(str(path) if path.exists() else spec)
    try:
        return UNetMotionModel.from_unet2d(unet, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"motion_adapter: {spec} does not fit this base model ({err}); use an SD1.5 adapter for "
                         "SD1.5 and an SDXL adapter for SDXL") from None


# -- IP-Adapter style reference in the teacher -------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class StyleReference:
    """An IP-Adapter on the preset's blocks (shared definition: ``comfyui_std.core.style_blocks``), fed with a style
    image. Only the teacher uses it: :meth:`scales` switches the adapter's per-layer scales between the preset (for
    teacher calls) and zero (for student and target calls), so the student learns the style without an image input.
    """

    def __init__(self, base: Base, ip_adapter: str, image_encoder: str, style_image: str, preset: str = "style",
                 weight: float = 1.0):
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        from comfyui_std.core.style_blocks import diffusers_ip_scale, parse_ip_adapter

        for name, p in (("ip_adapter", ip_adapter), ("image_encoder", image_encoder), ("style_image", style_image)):
            if not Path(p).expanduser().exists():
                raise ModelNotFoundError(f"{name}: {p} does not exist")
        try:
            flat = load_file(str(Path(ip_adapter).expanduser()))
        except Exception as err:
            raise ValueError(f"ip_adapter: {Path(ip_adapter).name} is not a readable safetensors file ({err})") \
                from None
        weights = parse_ip_adapter(flat)  # clear errors for Plus/FaceID/corrupt files
        context = int(base.unet.config.cross_attention_dim)
        if weights.cross_dim != context:
            raise ValueError(f"ip_adapter: this is an {weights.describe()}, but the base model cross-attends to "
                             f"width {context}: use the IP-Adapter made for your base model")
        nested = {"image_proj": {}, "ip_adapter": {}}
        for k, v in flat.items():
            head, rest = k.split(".", 1)
            nested[head][rest] = v
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(str(Path(image_encoder).expanduser()))
        self.encoder.requires_grad_(False)
        embeds = self._embed(style_image)
        if embeds.shape[-1] != weights.clip_dim:
            raise ValueError(f"image_encoder: it gives image embeddings of width {embeds.shape[-1]} but the "
                             f"IP-Adapter expects {weights.clip_dim}")
        base.unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
        self.unet = base.unet
        self.embeds = embeds  # [1, D]
        (config,) = _maybe_expand_lora_scales(base.unet, [diffusers_ip_scale(preset, base.arch, weight)],
                                              default_scale=0.0)
        self.preset_scales = {}
        for name, proc in base.unet.attn_processors.items():
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
        except Exception as err:
            raise ValueError(f"style_image: {path} is not a readable image ({type(err).__name__})") from None
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

    def added_cond(self, batch: int, uncond: bool, device) -> dict:
        e = torch.zeros_like(self.embeds) if uncond else self.embeds
        return {"image_embeds": [e.to(device).expand(batch, -1)[:, None]]}
