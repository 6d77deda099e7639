"""Devices and precisions by name: one check and one map for the app, the batch CLI and the trainers.

``--device`` takes ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. :func:`check_device` says why a name cannot be
used on this machine (not a device, no CUDA GPU, no GPU N, no MPS), so a run never lands silently on another device
than the one asked for; :func:`pick_device` turns ``auto`` into the best device present. :data:`DTYPES` maps the
precision names the options use to torch dtypes. Torch only (no diffusers, no gradio).
"""

from __future__ import annotations

import torch

from comfyui_std.core.errors import STDInputError

#: precision names of the options (--dtype, --frozen-dtype, --vae-dtype) -> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_device(device: str) -> str | None:
    """Why ``device`` cannot be used on this machine, or None (``auto`` always can)."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"'{device}' is not a device: use auto, cpu, cuda, cuda:1, mps, ..."
    if dev.type not in DEVICE_TYPES:
        return f"'{device}': only {', '.join(DEVICE_TYPES)} devices are supported (or auto)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"'{device}': no CUDA GPU is available to this torch (torch.cuda.is_available() is False)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"'{device}': there are only {torch.cuda.device_count()} CUDA devices"
    if dev.type == "mps" and not mps_available():
        return f"'{device}': MPS is not available on this machine"
    if dev.type in ("cpu", "mps") and dev.index not in (None, 0):
        return f"'{device}': there is one {dev.type} device ({dev.type})"
    return None


def pick_device(device: str) -> torch.device:
    """The device ``device`` names (checked by :func:`check_device`: a problem is an
    :class:`~comfyui_std.core.errors.STDInputError` of ``device``); ``auto`` is the CUDA GPU when there is one, else
    MPS, else the CPU."""
    problem = check_device(device)
    if problem:
        raise STDInputError("device", problem)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    return torch.device(device)
