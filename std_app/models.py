"""The model files the app runs on: the base pipeline, the STD LoRA catalog and the style reference.

Finding files (paths, names inside a ComfyUI ``models`` folder, Hugging Face references) and loading them (strict,
offline single files; LoRA fit checks; IP-Adapters and image encoders) is :mod:`std_hf`, shared with the trainer;
this module assembles what the app needs from it. Nothing here prints a traceback at a user: problems are
:class:`~comfyui_std.core.errors.STDInputError` messages naming the file and what to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.lora_format import eta_mismatch_warning, std_metadata
from std_hf.devices import vae_dtype_for
from std_hf.files import ModelRef, local_file, resolve, safetensors_metadata
from std_hf.ip_adapter import prepare_style_adapter

log = logging.getLogger("std_app")


# --------------------------------------------------------------------------------------------------------------------
# Base pipeline

def architecture(pipe) -> str:
    """``"sdxl"`` or ``"sd15"`` (the style-block preset family) from the pipeline class."""
    from diffusers import StableDiffusionXLPipeline

    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"


def load_pipeline(ref: ModelRef, dtype: torch.dtype, config: str | None = None,
                  models_dir: Path | None = None, tokenizer: str | None = None):
    """An SD1.5 or SDXL pipeline around the base model, loaded by :func:`std_hf.base.load_base` (the trainer's
    loader: single files offline with configs from their tensors and tokenizer files from ComfyUI or ``tokenizer``;
    ``config``, a diffusers folder or Hub id of the same architecture, for a single file whose layout is unusual).

    The pipeline is used as a container of modules (UNet, VAE, text encoders, scheduler config); the app drives the
    UNet with the STD sampler itself. The VAE runs in fp32, or in bf16 with ``dtype`` bf16, never in fp16
    (:func:`std_hf.devices.vae_dtype_for`: SD and SDXL VAEs overflow there). The pipeline stays on the CPU: the
    engine places it by the memory plan.
    """
    from diffusers import AutoencoderTiny

    from std_hf.base import as_pipeline, load_base

    base = load_base(ref, dtype, tokenizer, models_dir, config=config, vae_dtype=torch.float32)
    if isinstance(base.vae, AutoencoderTiny):
        raise STDInputError("base model", f"'{ref.label}' holds a TAESD preview VAE; the app needs the full VAE of "
                                          "the base model")
    vae_dtype, _ = vae_dtype_for(dtype)
    base.vae.to(vae_dtype)
    for report in base.reports:
        log.info("%s: %s", ref.label, report.line())
    return as_pipeline(base)


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
    """The string metadata of a LoRA's .safetensors header (without reading tensors)."""
    return safetensors_metadata(path, "lora")


def lora_entry(path: Path) -> LoraEntry:
    meta = std_metadata(read_safetensors_metadata(path), path.name)
    if meta.get("invalid"):
        log.warning("LoRA %s: its header holds values no training uses (%s); they are ignored", path.name,
                    ", ".join(meta["invalid"]))
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


# --------------------------------------------------------------------------------------------------------------------
# IP-Adapter and its image encoder

def attach_ip_adapter(pipe, adapter_path: Path, encoder_path: Path, base_label: str) -> str:
    """Validate an IP-Adapter and its image encoder against the pipeline, then load both into it.

    Returns a short description (file names). Errors (wrong base, wrong encoder width, Plus/FaceID files) are
    :class:`STDInputError` from the checks the trainer's teacher uses too
    (:func:`std_hf.ip_adapter.prepare_style_adapter`).
    """
    nested, weights, encoder = prepare_style_adapter(pipe.unet, adapter_path, encoder_path, base_label,
                                                     pipe.unet.dtype)
    pipe.register_modules(image_encoder=encoder.to(pipe.device))
    pipe.load_ip_adapter(nested, subfolder="", weight_name=adapter_path.name, image_encoder_folder=None)
    log.info("style reference: %s (%s) with image encoder %s", adapter_path.name, weights.describe(),
             encoder_path.name)
    return f"{adapter_path.name} + {encoder_path.name}"
