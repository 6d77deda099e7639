"""Trainer configuration: dataclass fields with help texts, presets, TOML/YAML files and CLI overrides.

Precedence: field defaults < ``--preset`` < ``--config FILE`` < command-line flags. Every field is a flag
(``max_steps`` -> ``--max-steps``); list fields take comma-separated values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, get_origin, get_type_hints


def option(default, help: str, **kw):
    """A config field with its ``--help`` text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class CommonConfig:
    """Options every method shares (the trainer skeleton)."""
    base: str = option("", "Base model: a diffusers folder, a single-file SD1.5/SDXL .safetensors (e.g. from "
                           "ComfyUI/models/checkpoints), a Hub id, or 'tiny' (random, for CPU smoke runs).")
    tokenizer: str = option("", "Folder with the CLIP tokenizer (vocab.json, merges.txt) for SD1.5 single files "
                                "when it is not in the Hugging Face cache.")
    output: str = option("output/std", "Output folder: checkpoints/, logs/, previews/ and the exported LoRA.")
    name: str = option("", "Base name of the exported LoRA files (default: derived from method and settings).")
    max_steps: int = option(1000, "Number of optimizer steps.")
    resolution: int = option(512, "Training resolution (square crops, multiple of 8).")
    batch_size: int = option(1, "Samples per micro-step per process.")
    grad_accum: int = option(1, "Micro-steps per optimizer step.")
    learning_rate: float = option(5e-6, "Learning rate of the trained LoRA (the paper: 5e-6).")
    lr_warmup: int = option(100, "Linear warm-up steps before the cosine decay.")
    max_grad_norm: float = option(10.0, "Gradient-norm clip of the trained LoRA (0 = off).")
    lora_rank: int = option(64, "LoRA rank (the paper: 64).")
    lora_alpha: float = option(64.0, "LoRA alpha (the paper: 64, i.e. scale 1).")
    lora_targets: list = option(["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                 "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                                 "upsamplers.0.conv", "time_emb_proj"],
                                "Module-name suffixes that get LoRA (default: the paper's list).")
    device: str = option("auto", "cuda, cuda:N, mps, cpu, or auto.")
    mixed_precision: str = option("no", "no, fp16 or bf16 (bf16 recommended on recent GPUs).")
    vae_dtype: str = option("fp32", "Precision of the VAE (fp32 is safe; the stock SDXL VAE overflows in fp16).")
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet.")
    use_8bit_adam: bool = option(False, "bitsandbytes AdamW8bit (needs bitsandbytes; falls back with a warning).")
    cache_latents: bool = option(False, "Encode each training image once (center crop, no flip) and reuse it.")
    seed: int = option(0, "Seed of data order, crops, noise and the bank (per rank: seed + rank).")
    checkpoint_every: int = option(500, "Write a checkpoint every N steps (atomically).")
    keep_checkpoints: int = option(3, "Checkpoints kept; older ones are deleted after a new one is complete.")
    resume: str = option("", "'latest' or a checkpoint folder to continue from exactly.")
    log_every: int = option(10, "Log scalars to TensorBoard every N steps.")
    preview_every: int = option(0, "Write a preview grid every N steps (0 = only at the end).")
    preview_images: str = option("", "Folder of held-out content images for previews (default: first data images).")
    num_previews: int = option(2, "Number of content images in a preview grid (0 = no previews).")
    export_every: int = option(0, "Also export the LoRA every N steps (0 = only at the end).")


def _parse_value(kind, raw: str):
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if kind is list or get_origin(kind) is list:
        if isinstance(raw, list):
            return raw
        items = [x.strip() for x in str(raw).split(",") if x.strip()]
        return [int(x) if x.lstrip("-").isdigit() else x for x in items]
    return kind(raw)


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config: {path} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text) or {}
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config: {path}: use a .toml, .yaml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a table of options")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser(cls, prog: str, description: str, presets: dict[str, dict]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", help="TOML, YAML or JSON file with any of the options below.")
    ap.add_argument("--preset", choices=sorted(presets), help="Start from a preset: " + "; ".join(
        f"{k}: {v.get('_doc', '')}" for k, v in sorted(presets.items())))
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=kind.__name__.upper()
                        if hasattr(kind, "__name__") else "VALUE", help=f"{f.metadata.get('help', '')} "
                        f"[default: {shown}]")
    ap.set_defaults(_cls=cls)
    return ap


def resolve(cls, args: argparse.Namespace, presets: dict[str, dict]):
    """The config from defaults < preset < file < flags, type-checked; raises ValueError with the option name."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update({k: v for k, v in presets[args.preset].items() if not k.startswith("_")})
    if args.config:
        values.update(load_file(args.config))
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config: unknown option(s) {', '.join(unknown)}")
    typed = {}
    for k, v in values.items():
        kind = hints[k]
        kind = list if get_origin(kind) is list else kind
        try:
            typed[k] = _parse_value(kind, v) if not (kind is float and isinstance(v, int)) else float(v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--{k.replace('_', '-')}: {err}") from None
    return cls(**typed)


def config_from_argv(cls, presets: dict[str, dict], argv, prog: str = "", description: str = "", **overrides):
    """Parse ``argv`` like the command line does (--help and usage errors exit), resolve it, then apply
    ``overrides`` (field names, already typed)."""
    args = build_parser(cls, prog, description, presets).parse_args(argv)
    return dataclasses.replace(resolve(cls, args, presets), **overrides)


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


__all__ = ["CommonConfig", "option", "build_parser", "resolve", "config_from_argv", "as_dict", "load_file"]
