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


def vae_dtype_for(requested: torch.dtype) -> tuple[torch.dtype, str | None]:
    """The precision a VAE encodes and decodes in, and a notice when it is not the one requested.

    A VAE runs in fp32, or in bf16 when that is asked for; never in fp16: the SDXL VAE overflows there (NaN
    latents with real weights) and diffusers upcasts SD VAEs (``force_upcast``) for the same reason, so fp16 (and
    anything else) becomes fp32, with a notice."""
    if requested in (torch.float32, torch.bfloat16):
        return requested, None
    return torch.float32, (f"the VAE runs in fp32, not {str(requested).replace('torch.', '')}: SD and SDXL VAEs "
                           "overflow in fp16 (NaN latents); use bf16 to halve its memory")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 (CUDA GPUs from Ampere on; the CPU emulates it)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return True
