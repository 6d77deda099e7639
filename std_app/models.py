"""Find and load the model files the app runs on, with messages a user can act on.

Files come as users have them: a path, a name inside a ComfyUI ``models`` folder (``--models-dir``), or a Hugging Face
reference (a base model id ``owner/name``; a single file as ``hf:owner/name/path/file.safetensors``), which downloads
with a progress bar. A missing file raises :class:`~comfyui_std.core.errors.STDInputError` naming the file and the
folder to put it in; nothing here prints a traceback at a user.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.lora import eta_mismatch_warning, std_metadata, to_kohya
from comfyui_std.core.style_blocks import check_adapter_fits, check_image_embeds, ip_layer_order, parse_ip_adapter

#: ComfyUI ``models/`` sub-folders searched for each kind of file
FOLDERS = {"base": ("checkpoints", "diffusers"), "lora": ("loras",), "ip_adapter": ("ipadapter",),
           "image_encoder": ("clip_vision",)}
#: what each kind is, for messages
WHAT = {
    "base": "base model (SDXL or SD1.5: a diffusers folder or a single .safetensors checkpoint, e.g. "
            "sd_xl_base_1.0.safetensors)",
    "lora": "STD LoRA (e.g. std_sdxl_i2i_eta0.75.safetensors from SecondComming/Single-Trajectory-Distillation)",
    "ip_adapter": "IP-Adapter (e.g. ip-adapter_sdxl_vit-h.safetensors from h94/IP-Adapter, sdxl_models/)",
    "image_encoder": "CLIP image encoder of the IP-Adapter (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, "
                     "h94/IP-Adapter models/image_encoder/model.safetensors)",
}
LABEL = {"base": "base model", "lora": "lora", "ip_adapter": "IP-Adapter", "image_encoder": "image encoder"}
FLAG = {"base": "--base", "lora": "--lora", "ip_adapter": "--ip-adapter", "image_encoder": "--image-encoder"}
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
log = logging.getLogger("std_app")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """Where one model comes from: a local path, or a Hub repository (and file inside it)."""

    kind: str
    path: Path | None = None
    repo_id: str | None = None
    filename: str | None = None

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path.name
        return f"{self.repo_id}/{self.filename}" if self.filename else str(self.repo_id)


def not_found(kind: str, value: str, models_dir: Path | None) -> STDInputError:
    """The message for a model file that is not there: what it is, where it was looked for, where to put it."""
    folders = [models_dir / f for f in FOLDERS[kind]] if models_dir else []
    looked = f" Looked in: {', '.join(str(f) for f in folders)}." if folders else ""
    put = (f"Put it into {folders[0]}" if folders else "Pass the full path") + f", or pass {FLAG[kind]} /full/path"
    return STDInputError(LABEL[kind], f"'{value}' was not found: it should be the {WHAT[kind]}.{looked} {put}.")


def resolve(kind: str, value: str, models_dir: Path | None = None) -> ModelRef:
    """Turn a user's ``value`` (path, name in the models folder, or Hub reference) into a :class:`ModelRef`."""
    value = str(value).strip().strip('"')
    if not value:
        raise not_found(kind, value, models_dir)
    if value.startswith("hf:"):
        parts = value[3:].split("/")
        if len(parts) == 2 and kind == "base":
            return ModelRef(kind, repo_id="/".join(parts))
        if len(parts) < 3:
            raise STDInputError(LABEL[kind], f"'{value}': a Hub file is hf:owner/name/path/to/file")
        return ModelRef(kind, repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
    path = Path(value).expanduser()
    if path.exists():
        return ModelRef(kind, path=path.resolve())
    if models_dir is not None and not path.is_absolute():
        for folder in FOLDERS[kind]:
            for candidate in (models_dir / folder / value, *((models_dir / folder / (value + s)) for s in
                                                             WEIGHT_SUFFIXES)):
                if candidate.exists():
                    return ModelRef(kind, path=candidate.resolve())
    if kind == "base" and _HUB_ID.match(value) and not value.endswith(WEIGHT_SUFFIXES):
        return ModelRef(kind, repo_id=value)
    raise not_found(kind, value, models_dir)


def local_file(ref: ModelRef) -> Path:
    """The file of a reference, downloading a Hub file (with huggingface_hub's progress bar) when needed."""
    if ref.path is not None:
        return ref.path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, ref.filename))
    except Exception as err:  # offline, missing repo or file: many exception types
        raise STDInputError(LABEL[ref.kind], f"could not download {ref.label} from the Hugging Face Hub "
                                             f"({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------------------------------------------------
# Base pipeline

def architecture(pipe) -> str:
    """``"sdxl"`` or ``"sd15"`` (the style-block preset family) from the pipeline class."""
    from diffusers import StableDiffusionXLPipeline

    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"


def load_pipeline(ref: ModelRef, dtype: torch.dtype, device: str, config: str | None = None):
    """Load an SD1.5 or SDXL pipeline from a diffusers folder, a single checkpoint file or a Hub id.

    The pipeline is used as a container of modules (UNet, VAE, text encoders, scheduler config); the app drives the
    UNet with the STD sampler itself. A single-file checkpoint needs its diffusers configs: ``config`` (a local
    diffusers folder or Hub id of the same architecture), else diffusers fetches them from the Hub once.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = ref.label
    try:
        with warnings.catch_warnings():  # newer diffusers call torch_dtype "dtype"; older ones only know torch_dtype
            warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
            pipe = _load(ref, dtype, config)
    except STDInputError:
        raise
    except Exception as err:  # diffusers/huggingface_hub raise many types for unreadable or unreachable models
        if ref.path is None:
            where = " (a Hub id needs network access the first time)"
        elif ref.path.is_file():
            where = (" (a single-file checkpoint needs its diffusers configs: diffusers fetches them from the Hub once, "
                     "or pass --base-config with a local diffusers folder of the same architecture)")
        else:
            where = ""
        raise STDInputError("base model", f"could not load '{name}'{where}: {type(err).__name__}: "
                                          f"{_first_line(err)}") from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise STDInputError("base model", f"'{name}' is a {type(pipe).__name__}; STD runs on SD1.5 and SDXL "
                                          "(StableDiffusionPipeline / StableDiffusionXLPipeline) checkpoints")
    if dtype != torch.float32 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16
    return pipe.to(device)


def _load(ref: ModelRef, dtype: torch.dtype, config: str | None):
    from diffusers import DiffusionPipeline

    if ref.path is not None and ref.path.is_file():
        return _load_single_file(ref.path, dtype, config)
    source = str(ref.path) if ref.path is not None else ref.repo_id
    index = DiffusionPipeline.load_config(source)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)


def _load_single_file(path: Path, dtype: torch.dtype, config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise STDInputError("base model", f"'{path.name}': single-file checkpoints must be .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # corrupt header
        raise STDInputError("base model", f"'{path.name}' is not a readable .safetensors file ({err})") from None
    is_xl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    kwargs = {"config": config} if config else {}
    if not is_xl:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------------------------------
# STD LoRAs

@dataclass(frozen=True)
class LoraEntry:
    """One STD LoRA file and what it says about itself."""

    name: str          # shown in the UI (file stem)
    path: Path
    eta: float | None  # the start strength it was trained for
    kind: str          # "i2i" or "v2v"
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def adapter_name(self) -> str:
        return "std_" + re.sub(r"\W", "_", self.name)

    @property
    def t_init(self) -> int:
        """For SiD-LSG one-step LoRAs: the timestep the generator was distilled at (625 when unknown)."""
        value = self.metadata.get("t_init")
        return int(value) if isinstance(value, (int, float)) else 625

    def describe(self) -> str:
        if self.kind == "onestep":
            return f"{self.name} (SiD-LSG one-step, t_init {self.t_init})"
        eta = f"trained η {self.eta:g}" if self.eta is not None else "trained η unknown"
        return f"{self.name} ({self.kind}, {eta})"

    def eta_warning(self, start_strength: float) -> str | None:
        return eta_mismatch_warning(self.eta, start_strength)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a .safetensors header (without reading tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # corrupt header
        raise STDInputError("lora", f"'{path.name}' is not a readable .safetensors file ({err})") from None


def lora_entry(path: Path) -> LoraEntry:
    meta = std_metadata(read_safetensors_metadata(path), path.name)
    eta = meta.get("start_strength")
    if meta.get("method") == "sid_lsg":
        kind = "onestep"  # a SiD-LSG one-step text-to-image generator
    else:
        kind = "v2v" if "v2v" in path.name.lower() or meta.get("kind") == "v2v" else "i2i"
    return LoraEntry(path.stem, path, float(eta) if eta is not None else None, kind, meta)


class LoraCatalog:
    """The STD LoRAs the app offers, by name; i2i files are listed first for images, v2v first for video."""

    def __init__(self, entries: list[LoraEntry]):
        self.entries = {e.name: e for e in entries}

    @classmethod
    def discover(cls, values: list[str], models_dir: Path | None) -> "LoraCatalog":
        """The LoRAs named with --lora, or else every STD LoRA in ``models_dir/loras`` (name contains "std" or the
        header carries std.* metadata)."""
        if values:
            return cls([lora_entry(local_file(resolve("lora", v, models_dir))) for v in values])
        folder = models_dir / "loras" if models_dir else None
        if folder is None or not folder.is_dir():
            return cls([])
        entries = []
        for path in sorted(folder.glob("*.safetensors")):
            entry = lora_entry(path)
            if "std" in path.stem.lower() or any(k.startswith("std.") for k in
                                                 read_safetensors_metadata(path)):
                entries.append(entry)
        return cls(entries)

    def choices(self, kind: str = "i2i") -> list[str]:
        """Names for a tab: its own kind first; one-step generators only where one-step is asked for."""
        names = [n for n in self.entries if (self.entries[n].kind == "onestep") == (kind == "onestep")]
        return sorted(names, key=lambda n: (self.entries[n].kind != kind, n))

    def default(self, kind: str = "i2i", eta: float = 0.75) -> str | None:
        """The LoRA of this kind closest to ``eta`` (the official demo's η 0.75 by default)."""
        pool = [e for e in self.entries.values() if e.kind == kind] or [e for e in self.entries.values()
                                                                          if e.kind != "onestep"]
        if not pool:
            return None
        return min(pool, key=lambda e: (e.eta is None, abs((e.eta or 0.0) - eta), e.name)).name

    def get(self, name: str | None) -> LoraEntry | None:
        if name in (None, "", NO_LORA):
            return None
        if name not in self.entries:
            loaded = ", ".join(self.entries) or "none"
            raise STDInputError("lora", f"'{name}' is not one of the loaded LoRAs ({loaded})")
        return self.entries[name]


NO_LORA = "(none: base model)"


def _unet_module_index(unet) -> dict[str, torch.nn.Module]:
    """kohya-style names (``down_blocks_0_attentions_0_..._to_q``) of every Linear/Conv layer of a diffusers UNet."""
    index = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            name = name.removesuffix(".base_layer")  # a layer that already carries a PEFT adapter
            index[name.replace(".", "_")] = module
    return index


def _in_width(module: torch.nn.Module) -> int:
    return module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels


def check_lora_fits(unet, state_dict: dict[str, torch.Tensor], entry: LoraEntry, base_label: str) -> None:
    """Refuse a LoRA made for another base model before diffusers half-applies it.

    Checks every UNet layer of the LoRA (kohya, PEFT or old diffusers keys with diffusers module names) against the
    UNet: the layer must exist and its input width must match the LoRA's down projection. Files with original
    (LDM) block names are left to diffusers' own conversion.
    """
    kohya, _motion = to_kohya(state_dict)
    downs = {k[: -len(".lora_down.weight")]: v for k, v in kohya.items()
             if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}
    if not downs or any(re.match(r"lora_unet_(input|output|middle)_block", k) for k in downs):
        return
    index = _unet_module_index(unet)
    problems = []
    for key, down in downs.items():
        module = index.get(key[len("lora_unet_"):])
        if module is None:
            problems.append(f"{key[len('lora_unet_'):]} does not exist")
        elif down.ndim >= 2 and down.shape[1] != _in_width(module):
            problems.append(f"{key[len('lora_unet_'):]} takes {down.shape[1]} inputs, the model's takes "
                            f"{_in_width(module)}")
    if problems:
        made_for = entry.metadata.get("base_model") or _guess_lora_base(downs)
        raise STDInputError("lora", f"'{entry.name}' does not fit the loaded base model {base_label}: "
                                    f"{len(problems)} of {len(downs)} layers do not match (e.g. {problems[0]}). "
                                    f"It was made for {made_for}; pick an STD LoRA for your base model")


def _guess_lora_base(downs: dict[str, torch.Tensor]) -> str:
    widths = {int(v.shape[1]) for k, v in downs.items() if k.endswith("attn2_to_k") and v.ndim == 2}
    for width, label in ((2048, "SDXL"), (768, "SD1.5"), (1024, "SD2.x")):
        if width in widths:
            return label
    return "another base model"


# --------------------------------------------------------------------------------------------------------------------
# IP-Adapter and its image encoder

#: (hidden width, layers) of known CLIP vision towers -> (attention heads, activation)
CLIP_VISION_KNOWN = {(1280, 32): (16, "gelu"), (1664, 48): (16, "gelu"), (1024, 24): (16, "quick_gelu"),
                     (768, 12): (12, "quick_gelu")}


def clip_vision_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """A transformers ``CLIPVisionConfig`` for a single-file CLIP vision tower (the ComfyUI ``clip_vision`` files),
    read from its tensor shapes; heads and activation come from :data:`CLIP_VISION_KNOWN` (else width // 64, gelu)."""
    pre = "vision_model."
    hidden = int(state_dict[pre + "embeddings.class_embedding"].shape[0])
    patch = int(state_dict[pre + "embeddings.patch_embedding.weight"].shape[-1])
    positions = int(state_dict[pre + "embeddings.position_embedding.weight"].shape[0])
    layers = len({k.split(".")[3] for k in state_dict if k.startswith(pre + "encoder.layers.")})
    heads, act = CLIP_VISION_KNOWN.get((hidden, layers), (max(1, hidden // 64), "gelu"))
    return {"hidden_size": hidden, "patch_size": patch, "image_size": int(round((positions - 1) ** 0.5)) * patch,
            "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": act,
            "intermediate_size": int(state_dict[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "projection_dim": int(state_dict["visual_projection.weight"].shape[0]), "layer_norm_eps": 1e-5}


def load_image_encoder(path: Path, dtype: torch.dtype):
    """A ``CLIPVisionModelWithProjection`` from a transformers folder or a single .safetensors file."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if path.is_dir():
        return CLIPVisionModelWithProjection.from_pretrained(str(path), dtype=dtype)
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as err:  # corrupt file
        raise STDInputError("image encoder", f"'{path.name}' is not a readable .safetensors file ({err})") from None
    if "visual_projection.weight" not in sd or "vision_model.embeddings.class_embedding" not in sd:
        raise STDInputError("image encoder", f"'{path.name}' is not a CLIP vision model with projection in "
                                             f"transformers format; use e.g. {WHAT['image_encoder'].split('e.g. ')[1]}")
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_vision_config(sd)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise STDInputError("image encoder", f"'{path.name}' lacks {len(missing)} weights (e.g. {missing[0]})")
    return model.to(dtype)


def read_ip_adapter(path: Path) -> dict:
    """The IP-Adapter state dict in diffusers' nested layout ``{"image_proj": ..., "ip_adapter": ...}``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path))
        except Exception as err:  # corrupt file
            raise STDInputError("IP-Adapter", f"'{path.name}' is not a readable .safetensors file ({err})") from None
    else:
        flat = torch.load(str(path), map_location="cpu", weights_only=True)
    nested: dict = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        if isinstance(v, dict) and k in nested:
            nested[k].update(v)
        elif "." in k and k.split(".", 1)[0] in nested:
            head, rest = k.split(".", 1)
            nested[head][rest] = v
    return nested


def attach_ip_adapter(pipe, adapter_path: Path, encoder_path: Path, base_label: str) -> str:
    """Validate an IP-Adapter and its image encoder against the pipeline, then load both into it.

    Returns a short description (file names). Errors (wrong base, wrong encoder width, Plus/FaceID files) are
    :class:`STDInputError` from the shared core checks.
    """
    sd = read_ip_adapter(adapter_path)
    try:
        weights = parse_ip_adapter(sd)
    except STDInputError as err:
        raise STDInputError("IP-Adapter", f"'{adapter_path.name}': {str(err).split(': ', 1)[1]}") from None
    attn2 = {name[: -len(".processor")]: name for name in pipe.unet.attn_processors if name.endswith("attn2.processor")}
    inner = [pipe.unet.get_submodule(n).to_k.out_features for n in ip_layer_order(attn2)]
    check_adapter_fits(weights, pipe.unet.config.cross_attention_dim, inner, base_label)
    encoder = load_image_encoder(encoder_path, pipe.unet.dtype)
    check_image_embeds(weights, torch.zeros(1, encoder.config.projection_dim))
    pipe.register_modules(image_encoder=encoder.to(pipe.device))
    pipe.load_ip_adapter(sd, subfolder="", weight_name=adapter_path.name, image_encoder_folder=None)
    log.info("style reference: %s (%s) with image encoder %s", adapter_path.name, weights.describe(),
             encoder_path.name)
    return f"{adapter_path.name} + {encoder_path.name}"

