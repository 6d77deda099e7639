"""Command-line model options shared by ``gradio_app.py`` and ``python -m std_app.batch``.

:func:`add_model_arguments` adds the flags that say where the models come from (and the device/dtype they run
on); :func:`model_options` turns the parsed flags into :class:`~std_app.startup.ModelOptions` for
:func:`~std_app.startup.load_engine`, building the tiny offline zoo for ``--tiny``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from std_hf.devices import check_device
from std_hf.memory import OFFLOAD_MODES

from .startup import ModelOptions, tiny_options

TINY_ARCHITECTURES = ("sd15", "sdxl")


def bounded(kind: type, low, high, expected: str):
    """An argparse ``type`` for a number of ``kind`` in [low, high]: ``expected <what>, got 'x'`` for text that is
    not one, ``got V, allowed range is [low, high]`` outside the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"got {value}, allowed range is [{low}, {high}]")
        return value

    return parse


_budget = bounded(float, 0.25, 4096.0, "a number of GiB")


def _device(value: str) -> str:
    problem = check_device(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("models (paths, names inside --models-dir, or Hugging Face references)")
    m.add_argument("--models-dir", type=Path, help="a ComfyUI models folder: checkpoints/, diffusers/, loras/, "
                                                  "ipadapter/, clip_vision/")
    m.add_argument("--base", help="SDXL or SD1.5 base: diffusers folder, single .safetensors file, file name in "
                                  "checkpoints/, or a Hub id (owner/name, downloads with a progress bar)")
    m.add_argument("--base-config", help="diffusers folder (or Hub id) with the configs of a single-file base")
    m.add_argument("--tokenizer", help="folder with the CLIP tokenizer files (vocab.json, merges.txt) of a single-file "
                                       "base, when no ComfyUI install is found (ComfyUI ships them in "
                                       "comfy/sd1_tokenizer)")
    m.add_argument("--lora", action="append", default=[], help="STD LoRA file (repeatable; default: every STD LoRA "
                                                               "in --models-dir/loras); hf:owner/name/file works too")
    m.add_argument("--ip-adapter", help="IP-Adapter file for the style reference (default: "
                                        "ip-adapter_sdxl_vit-h.safetensors in ipadapter/ if present)")
    m.add_argument("--image-encoder", help="its CLIP image encoder (default: CLIP-ViT-H-14-laion2B-s32B-b79K."
                                           "safetensors in clip_vision/ if present)")
    m.add_argument("--motion-module", help="motion module for videos, run as the STD v2v LoRAs were trained: a file "
                                           "in --models-dir/animatediff_models (AnimateDiff v2/v3, AnimateDiff-SDXL, "
                                           "Hotshot-XL hsxl_temporal_layers.safetensors), a path, a diffusers "
                                           "MotionAdapter folder, or 'tiny' (random, with --tiny); a v2v LoRA is then "
                                           "applied whole, its motion layers on the module")
    m.add_argument("--tiny", nargs="?", const=TINY_ARCHITECTURES[0], choices=TINY_ARCHITECTURES,
                   help="build tiny random models in-process (offline smoke test; default architecture sd15)")
    d = parser.add_argument_group("device")
    d.add_argument("--device", type=_device, default="auto",
                   help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    d.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="precision of the UNet and text encoders (auto: fp16 on a CUDA GPU, else fp32); the VAE runs "
                        "in fp32, or bf16 with --dtype bf16")
    d.add_argument("--offload", default="auto", choices=OFFLOAD_MODES,
                   help="where the models live: none (all on the GPU), model (each moves to the GPU when used), "
                        "sequential (layer by layer; the smallest cards); auto chooses from the GPU's free memory")
    d.add_argument("--vram-budget", type=_budget, metavar="GIB",
                   help="plan for this many GiB of GPU memory instead of the free memory the GPU reports")
    d.add_argument("--verbose", action="store_true", help="also show the libraries' own warnings (transformers, "
                                                          "diffusers), which are hidden by default")


def tiny_before_positionals(argv: list[str]) -> list[str]:
    """``--tiny`` followed by something other than an architecture means the default one: a bare ``--tiny`` before
    positional arguments (``--tiny photos/``) would otherwise take the first of them as its value."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--tiny" and (i + 1 == len(out) or out[i + 1] not in TINY_ARCHITECTURES):
            out[i] = f"--tiny={TINY_ARCHITECTURES[0]}"
    return out


def model_options(args: argparse.Namespace, tiny_root: Path | None = None) -> ModelOptions:
    """The :class:`ModelOptions` the flags of :func:`add_model_arguments` ask for (``tiny_root``: where ``--tiny``
    builds its models; a temporary folder by default)."""
    memory = {"offload": getattr(args, "offload", "auto"), "vram_budget": getattr(args, "vram_budget", None),
              "motion_module": getattr(args, "motion_module", None)}
    if args.tiny:  # the tiny zoo's base; --lora still names the LoRAs (e.g. one just trained with --preset tiny)
        return dataclasses.replace(tiny_options(args.tiny, tiny_root), loras=list(args.lora), **memory)
    return ModelOptions(base=args.base, base_config=args.base_config, tokenizer=args.tokenizer, loras=args.lora,
                        ip_adapter=args.ip_adapter, image_encoder=args.image_encoder, models_dir=args.models_dir,
                        device=args.device, dtype=args.dtype, **memory)
