"""LoRA key formats and STD metadata, shared by the ComfyUI loader, the Gradio app and the trainer.

Formats met in practice:

* kohya / A1111 / ComfyUI: ``lora_unet_<diffusers path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (text encoders: ``lora_te1_`` / ``lora_te2_``). ComfyUI's LoraLoader applies every key of this form.
* diffusers / PEFT (the released STD LoRAs): ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``; ComfyUI
  ignores the attention keys of this form ("lora key not loaded").
* older diffusers: ``unet.<path>.lora.down.weight`` / ``.lora.up.weight``.

:func:`to_kohya` turns any of them into the kohya form; motion-module keys (AnimateDiff) are split off because
ComfyUI's UNet key map has no place for them.

STD metadata lives in the safetensors header under ``std.*`` keys (strings), e.g. ``std.start_strength = "0.75"``.
"""

from __future__ import annotations

import json
import math
import re

import torch

from .tensors import nonfinite_count

META_PREFIX = "std."
#: metadata keys written by the trainer and read by the nodes and the app
META_KEYS = ("method", "start_strength", "start_index", "nfe", "gamma", "base_model", "resolution", "rr", "steps",
             "t_init", "rank", "alpha")

_PEFT_SUFFIX = re.compile(r"\.(lora_A|lora_B)(?:\.default)?\.weight$")
_OLD_DIFFUSERS_SUFFIX = re.compile(r"\.lora\.(down|up)\.weight$")
_KOHYA = re.compile(r"^(lora_unet_|lora_te\d?_|lycoris_)")
_ETA_IN_NAME = re.compile(r"eta[_-]?(0?\.\d+|1(?:\.0+)?)")


def is_motion_key(key: str) -> bool:
    return "motion_modules" in key or "temporal_transformer" in key


def _prefix_for(module_path: str) -> tuple[str, str]:
    """(kohya prefix, module path without its model prefix)."""
    for pre, kohya in (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_"),
                       ("base_model.model.", "lora_unet_")):
        if module_path.startswith(pre):
            return kohya, module_path[len(pre):]
    return "lora_unet_", module_path


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | None = None):
    """Convert a LoRA state dict to kohya keys.

    Args:
        state_dict: LoRA tensors in kohya, PEFT/diffusers or old diffusers form.
        alpha: LoRA alpha for formats that do not store it per module (PEFT); ``None`` means alpha = rank (scale 1).

    Returns:
        ``(kohya_state_dict, motion_state_dict)``; motion-module tensors keep their original keys.
    """
    out: dict[str, torch.Tensor] = {}
    motion: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_motion_key(key):
            motion[key] = value
            continue
        if _KOHYA.match(key):
            out[key] = value
            continue
        m = _PEFT_SUFFIX.search(key) or _OLD_DIFFUSERS_SUFFIX.search(key)
        if m is None:
            continue  # not a LoRA tensor (e.g. a stray alpha of an unknown layout)
        module = key[: m.start()]
        kohya_prefix, path = _prefix_for(module)
        name = kohya_prefix + path.replace(".", "_")
        up = m.group(1) in ("lora_B", "up")
        out[f"{name}.{'lora_up' if up else 'lora_down'}.weight"] = value
        if not up:
            rank = value.shape[0]
            out[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return out, motion


#: the dtypes a LoRA factor may have (an int8 "LoRA" is not one; quantised LoRAs are not a format this pack reads)
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FACTOR = re.compile(r"\.(lora_down|lora_up|lora_A|lora_B)(?:\.default)?\.weight$|\.lora\.(down|up)\.weight$"
                     r"|\.lora_linear_layer\.(down|up)\.weight$")
_PARTNER = {"lora_down": "lora_up", "lora_up": "lora_down", "lora_A": "lora_B", "lora_B": "lora_A", "down": "up",
            "up": "down"}


def check_lora_tensors(state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Refuse a LoRA whose tensors cannot be applied as they are: a factor that is not a float tensor, a non-finite
    value (NaN or inf: every output would be NaN), or a factor without its partner (a ``lora_down`` without its
    ``lora_up``, a ``lora_A`` without its ``lora_B``). Raises ``ValueError`` naming the file and the first tensor."""
    modules: dict[str, set[str]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: {key} is not a tensor")
        m = _FACTOR.search(key)
        if m is None and not key.endswith(".alpha"):
            continue
        if value.dtype not in FACTOR_DTYPES:
            raise ValueError(f"{name}: {key} is {str(value.dtype).replace('torch.', '')}; LoRA weights are float "
                             "tensors (fp16, bf16 or fp32)")
        bad = nonfinite_count(value)
        if bad:
            raise ValueError(f"{name}: {key} holds {bad} non-finite value(s) (NaN or inf); the file is damaged")
        if m is not None:
            role = next(g for g in m.groups() if g)
            modules.setdefault(key[:m.start()] + "|" + ("kohya" if role.startswith("lora_") and role in (
                "lora_down", "lora_up") else "peft" if role in ("lora_A", "lora_B") else "old"), set()).add(role)
    for module, roles in sorted(modules.items()):
        for role in roles:
            if _PARTNER[role] not in roles:
                raise ValueError(f"{name}: the layer {module.split('|')[0]} has a {role} factor but no "
                                 f"{_PARTNER[role]}; the file is damaged or not a LoRA")


def lora_module_names(kohya_sd: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".")[0] for k in kohya_sd if k.endswith((".lora_down.weight", ".lora_up.weight"))}


def peft_alpha_from_metadata(metadata: dict[str, str] | None) -> float | None:
    """alpha from diffusers' ``lora_adapter_metadata`` header (PEFT LoraConfig), if present."""
    if not metadata:
        return None
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            cfg = json.loads(raw)
            if isinstance(cfg, dict) and "unet.lora_alpha" in cfg:  # diffusers packs the PEFT config as "unet.*"
                return float(cfg["unet.lora_alpha"])
            cfg = cfg.get("unet", cfg) if isinstance(cfg, dict) else {}
            if "lora_alpha" in cfg:
                return float(cfg["lora_alpha"])
        except (ValueError, TypeError, AttributeError):
            return None
    if metadata.get(META_PREFIX + "alpha"):
        try:
            return float(metadata[META_PREFIX + "alpha"])
        except ValueError:
            return None
    return None


#: the numbers a ``std.*`` header may carry, with the range each must lie in: (kind, low, high, low excluded)
META_RANGES = {"start_strength": (float, 0.0, 1.0, True), "nfe": (int, 1, 50, False), "gamma": (float, 0.0, 1.0, False),
               "start_index": (int, 1, 50, False), "t_init": (int, 1, 999, False), "rank": (int, 1, 4096, False),
               "alpha": (float, 0.0, 1e6, True), "resolution": (int, 8, 16384, False), "rr": (float, 0.0, 1.0, True),
               "steps": (int, 0, 10**9, False), "max_rank": (int, 1, 1 << 20, False)}


def _meta_number(name: str, value):
    """A header number within its range, or None."""
    kind, low, high, low_open = META_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or (kind is int and not float(value).is_integer()):
        return None
    if value < low or value > high or (low_open and value == low):
        return None
    return kind(value)


def std_metadata(metadata: dict[str, str] | None, filename: str = "") -> dict[str, object]:
    """STD settings a LoRA carries: its ``std.*`` header keys, or η parsed from a released file's name.

    Numbers outside their range (:data:`META_RANGES`: ``start_strength = "nan"``, ``nfe = "-3"``) are not settings
    anyone trained with: they are left out and listed under ``"invalid"`` (``name=value`` strings) for the caller to
    say so, never shown as the LoRA's values."""
    info: dict[str, object] = {}
    invalid: list[str] = []
    for k, v in (metadata or {}).items():
        if k.startswith(META_PREFIX):
            name = k[len(META_PREFIX):]
            try:
                value = json.loads(v)
            except (ValueError, TypeError):
                value = v
            if name in META_RANGES:
                if isinstance(value, str):
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                checked = _meta_number(name, value)
                if checked is None:
                    invalid.append(f"{name}={v!r}")
                    continue
                value = checked
            info[name] = value
    if invalid:
        info["invalid"] = invalid
    if "start_strength" not in info and filename:
        m = _ETA_IN_NAME.search(filename)
        if m:
            info["start_strength"] = float(m.group(1))
            info["source"] = "filename"
    return info


def encode_std_metadata(values: dict[str, object]) -> dict[str, str]:
    """``std.*`` safetensors header entries (JSON-encoded scalars) for the given settings."""
    out = {}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"metadata {k} is not finite")
        out[META_PREFIX + k] = json.dumps(v)
    return out


def eta_mismatch_warning(lora_eta: float | None, start_strength: float, tol: float = 1e-3) -> str | None:
    if lora_eta is None or abs(float(lora_eta) - float(start_strength)) <= tol:
        return None
    return (f"start_strength {start_strength:g} differs from the η {float(lora_eta):g} this STD LoRA was trained "
            f"for; results are best at {float(lora_eta):g}")
