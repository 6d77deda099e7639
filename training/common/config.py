"""Trainer configuration: dataclass fields with help texts, presets, TOML/YAML/JSON files and CLI overrides.

Precedence: field defaults < ``--preset`` < ``--config FILE`` < command-line flags. Every field is a flag
(``max_steps`` -> ``--max-steps``); list fields take comma-separated values; fields with ``choices`` accept only
those. A field marked ``free`` may change when a run is resumed (where files go, how often to log, preview or
checkpoint, how long to train); every other field defines the method, and a resume with a different value is refused
(:func:`method_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from comfyui_std.core.errors import STDInputError, check_range
from comfyui_std.core.argv import parse_args as parse_argv
from std_hf.devices import DTYPES as DTYPE_MAP
from std_hf.devices import check_device


def option(default, help: str, choices: tuple | None = None, free: bool = False, **kw):
    """A config field with its ``--help`` text; ``choices`` limits its values; ``free`` lets a resume change it."""
    meta = {"help": help, "choices": choices, "free": free, **kw}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
PRECISIONS = ("no", "fp16", "bf16")
DTYPES = tuple(DTYPE_MAP)


@dataclasses.dataclass
class CommonConfig:
    """Options every method shares (the trainer skeleton)."""
    base: str = option("", "Base model: a single-file SD1.5/SDXL .safetensors (e.g. from ComfyUI/models/checkpoints; "
                           "read offline), a diffusers folder, a Hub id, or 'tiny' (random, for CPU smoke runs).")
    tokenizer: str = option("", "Folder with the CLIP tokenizer files (vocab.json, merges.txt) for a single-file "
                                "base, when no ComfyUI install is found (ComfyUI ships them in comfy/sd1_tokenizer).")
    output: str = option("outputs/std", "Run folder (inside the app's outputs/ folder by default, which git ignores): config.json, train.log, checkpoints/, logs/, previews/ and the "
                                       "exported LoRA.", free=True)
    name: str = option("", "Base name of the exported LoRA files (default: derived from method and settings).",
                       free=True)
    max_steps: int = option(1000, "Number of optimizer steps.", free=True)
    resolution: int = option(512, "Training resolution: the side of the square bucket (multiple of 8); aspect "
                                  "buckets keep about this many pixels.")
    aspect_buckets: bool = option(True, "Aspect-ratio bucketing: each image is cropped to the bucket (width x height, "
                                        "about resolution² pixels, ratios 1:2 to 2:1) nearest its aspect; a batch "
                                        "holds one bucket. Off: square center-biased random crops.")
    batch_size: int = option(1, "Samples per micro-step per process.")
    grad_accum: int = option(1, "Micro-steps per optimizer step.")
    learning_rate: float = option(5e-6, "Learning rate of the trained LoRA (the paper: 5e-6).")
    lr_warmup: int = option(100, "Linear warm-up steps before the cosine decay.")
    max_grad_norm: float = option(10.0, "Gradient-norm clip of the trained LoRA (0 = off).")
    lora_rank: int = option(64, "LoRA rank (the paper: 64).")
    lora_alpha: float = option(64.0, "LoRA alpha (the paper: 64, i.e. scale 1).")
    lora_targets: list = option(LORA_TARGETS, "Module-name suffixes that get LoRA (default: the paper's list).")
    device: str = option("auto", "cuda, cuda:N, mps, cpu, or auto (a CUDA GPU, else MPS, else the CPU); a device this "
                                 "machine lacks is refused. With several processes (accelerate launch) each one gets "
                                 "its own GPU: use auto or cpu, and CUDA_VISIBLE_DEVICES to pick the GPUs.", free=True)
    mixed_precision: str = option("no", "no, fp16 (with a gradient scaler per optimiser) or bf16 (recommended on "
                                        "recent GPUs). The trained LoRA and its optimiser state stay fp32.",
                                  choices=PRECISIONS)
    frozen_dtype: str = option("auto", "Precision of the frozen UNet and text encoders (auto: bf16/fp16 with that "
                                       "mixed precision, else fp32).", choices=("auto",) + DTYPES)
    vae_dtype: str = option("fp32", "Precision of the VAE: fp32 or bf16 (fp16 runs as fp32: SD and SDXL VAEs "
                                    "overflow in fp16). It always runs outside the mixed-precision autocast.",
                            choices=DTYPES)
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet.", free=True)
    use_8bit_adam: bool = option(False, "bitsandbytes AdamW8bit (needs bitsandbytes; refused without it).")
    offload_text_encoders: bool = option(False, "Encode every caption (and the preview captions) once at the start, "
                                                "then move the text encoders to the CPU.", free=True)
    cache_latents: bool = option(False, "Encode each training image once and keep its latent on disk "
                                        "(center crop of its bucket, both flips; posterior samples are still drawn).")
    latent_cache_dir: str = option("", "Folder of the latent cache (default: OUTPUT/latent_cache).", free=True)
    seed: int = option(0, "Seed of data order, crops, noise, LoRA init and the bank (per rank: derived from it).")
    checkpoint_every: int = option(500, "Write a checkpoint every N steps (atomically).", free=True)
    keep_checkpoints: int = option(3, "Checkpoints kept; older ones are deleted after a new one is complete.",
                                   free=True)
    resume: str = option("", "'latest' or a checkpoint folder to continue from exactly.", free=True)
    log_every: int = option(10, "Log scalars to TensorBoard every N steps.", free=True)
    preview_every: int = option(250, "Write a preview grid every N steps (0 = only at the end).", free=True)
    preview_images: str = option("", "Folder of content images for previews (default: the last num_previews data "
                                     "images by name, held out of training when the folder has at least 4x as "
                                     "many).", free=True)
    num_previews: int = option(2, "Number of content images in a preview grid (0 = no previews).", free=True)
    export_every: int = option(0, "Also export the LoRA every N steps (0 = only at the end).", free=True)
    time_phases: bool = option(False, "Log the seconds each phase of a step takes (STD: data, vae, text, teacher, "
                                      "target, student, discriminator, bank; SiD-LSG: text, generator, fake_score, "
                                      "teacher; both: backward, optimizer) to train.log and "
                                      "TensorBoard (time/<phase>_s); waits for the GPU at every phase boundary, so "
                                      "steps get a little slower.", free=True)


def _parse_value(kind, raw):
    if raw is None:  # a config file's null: not a value (a str() of it would be the folder "None")
        raise ValueError("got no value (null); give a value or leave the option out")
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
        if isinstance(raw, (dict, bool)):
            raise ValueError(f"expected a comma-separated list, got {raw!r}")
        items = [x.strip() for x in str(raw).split(",") if x.strip()]
        return [int(x) if x.lstrip("-").isdigit() else x for x in items]
    if kind is int:
        if isinstance(raw, (bool, list, dict)) or isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if kind is float:
        if isinstance(raw, (bool, list, dict)):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {raw!r}")
        return value
    if kind is str and isinstance(raw, (list, dict)):
        raise ValueError(f"expected text, got {raw!r}")
    return kind(raw)


def load_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise STDInputError("config", f"{path} does not exist" if not p.exists() else f"{path} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise STDInputError("config", f"{path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise STDInputError("config", f"cannot read {path} ({err.strerror})") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise STDInputError("config", f"{path}: use a .toml, .yaml or .json file")
    except STDInputError:
        raise
    except Exception as err:  # tomllib/yaml/json parse errors (yaml's are not ValueErrors)
        raise STDInputError("config", f"{path} is not valid {p.suffix[1:].upper()} ({str(err).splitlines()[0]})") \
            from None
    if not isinstance(data, dict):
        raise STDInputError("config", f"{path} must hold a table of options")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser(cls, prog: str, description: str, presets: dict[str, dict]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # one default per flag
    ap.add_argument("--config", help="TOML, YAML or JSON file with any of the options below (a run folder's "
                                     "config.json works too).")
    ap.add_argument("--preset", choices=sorted(presets), help="Start from a preset: " + "; ".join(
        f"{k}: {v.get('_doc', '')}" for k, v in sorted(presets.items())))
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        choices = f.metadata.get("choices")
        extra = f" Choices: {', '.join(choices)}." if choices else ""
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                        metavar=kind.__name__.upper() if hasattr(kind, "__name__") else "VALUE",
                        help=f"{f.metadata.get('help', '')}{extra} [default: {shown}]")
    ap.set_defaults(_cls=cls)
    return ap


def resolve(cls, args: argparse.Namespace, presets: dict[str, dict]):
    """The config from defaults < preset < file < flags, type-checked; raises STDInputError with the option name."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update({k: v for k, v in presets[args.preset].items() if not k.startswith("_")})
    if args.config:
        loaded = load_file(args.config)
        if isinstance(loaded.get("options"), dict) and "method" in loaded:  # a run folder's config.json
            loaded = {str(k): v for k, v in loaded["options"].items()}
        values.update(loaded)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise STDInputError("config", f"unknown option(s) {', '.join(unknown)}")
    typed = {}
    for k, v in values.items():
        kind = hints[k]
        kind = list if get_origin(kind) is list else kind
        try:
            typed[k] = _parse_value(kind, v)
        except (TypeError, ValueError) as err:
            raise STDInputError(f"--{k.replace('_', '-')}", str(err)) from None
        choices = fields[k].metadata.get("choices")
        if choices and typed[k] not in choices:
            raise STDInputError(f"--{k.replace('_', '-')}", f"got {typed[k]!r}, choose one of {', '.join(choices)}")
    return cls(**typed)


def config_from_argv(cls, presets: dict[str, dict], argv, prog: str = "", description: str = "", **overrides):
    """Parse ``argv`` like the command line does (--help and usage errors exit), resolve it, then apply
    ``overrides`` (field names, already typed)."""
    args = parse_argv(build_parser(cls, prog, description, presets), argv)
    return dataclasses.replace(resolve(cls, args, presets), **overrides)


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def method_options(cfg) -> dict:
    """The options that define what is trained (everything not marked ``free``): a resume must match them."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("free")}


def differing(saved: dict, cfg) -> list[str]:
    """``name: saved -> now`` for each method-defining option that differs from a saved config."""
    now = method_options(cfg)
    out = []
    for k in sorted(now):
        if k in saved and saved[k] != now[k]:
            out.append(f"{k} {saved[k]!r} -> {now[k]!r}")
        elif k not in saved:
            out.append(f"{k} (not in the checkpoint) -> {now[k]!r}")
    return out


def validate_common(cfg) -> None:
    """Range checks of the skeleton's numeric options (the methods add their own)."""
    check_range("max_steps", cfg.max_steps, 1, 10**9, kind=int)
    check_range("resolution", cfg.resolution, 8, 4096, kind=int)
    if cfg.resolution % 8:
        raise STDInputError("resolution", f"got {cfg.resolution}, must be a multiple of 8")
    check_range("batch_size", cfg.batch_size, 1, 4096, kind=int)
    check_range("grad_accum", cfg.grad_accum, 1, 4096, kind=int)
    check_range("learning_rate", cfg.learning_rate, 0.0, 1.0, low_open=True)
    check_range("lr_warmup", cfg.lr_warmup, 0, 10**9, kind=int)
    check_range("max_grad_norm", cfg.max_grad_norm, 0.0, 1e6)
    check_range("lora_rank", cfg.lora_rank, 1, 4096, kind=int)
    check_range("lora_alpha", cfg.lora_alpha, 0.0, 1e6, low_open=True)
    if not cfg.lora_targets or not all(isinstance(t, str) and t for t in cfg.lora_targets):
        raise STDInputError("lora_targets", f"got {cfg.lora_targets!r}: give module-name suffixes such as to_q,to_k")
    check_range("seed", cfg.seed, 0, 2**31 - 1, kind=int)
    check_range("checkpoint_every", cfg.checkpoint_every, 0, 10**9, kind=int)
    check_range("keep_checkpoints", cfg.keep_checkpoints, 1, 10**6, kind=int)
    check_range("log_every", cfg.log_every, 1, 10**9, kind=int)
    check_range("preview_every", cfg.preview_every, 0, 10**9, kind=int)
    check_range("num_previews", cfg.num_previews, 0, 64, kind=int)
    check_range("export_every", cfg.export_every, 0, 10**9, kind=int)
    if not cfg.base:
        raise STDInputError("base", "give a base model (--base: a .safetensors checkpoint, diffusers folder, Hub id "
                                    "or 'tiny')")
    problem = check_device(str(cfg.device))
    if problem:
        raise STDInputError("device", problem)


def read_text_lines(path: str, name: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file; a missing, binary or empty file is a clear error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise STDInputError(name, f"{path} does not exist; give a text file with one entry per line" if not
                            p.exists() else f"{path} is not a file")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise STDInputError(name, f"cannot read {path} ({err.strerror})") from None
    if b"\x00" in raw:
        raise STDInputError(name, f"{path} is a binary file, not UTF-8 text (NUL byte at offset {raw.index(0)})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise STDInputError(name, f"{path} is not UTF-8 text (invalid byte at offset {err.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise STDInputError(name, f"{path} holds no non-empty lines")
    return lines


__all__ = ["CommonConfig", "option", "build_parser", "resolve", "config_from_argv", "as_dict", "load_file",
           "method_options", "differing", "validate_common", "read_text_lines", "LORA_TARGETS"]
