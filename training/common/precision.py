"""The trainers' precisions: which dtype the frozen weights and the VAE take, and the cast that keeps trained LoRA
factors in fp32 (so their gradients and optimiser state are fp32 under bf16 and fp16 too). The names are the
options' (``--frozen-dtype``, ``--vae-dtype``), mapped by the one table :data:`std_hf.devices.DTYPES`."""

from __future__ import annotations

import logging

import torch

from std_hf.base import cast_floats
from std_hf.devices import DTYPES, vae_dtype_for

log = logging.getLogger("training")

__all__ = ["DTYPES", "frozen_dtype", "vae_dtype", "cast_frozen"]


def frozen_dtype(cfg) -> torch.dtype:
    """The dtype of the frozen UNet and text encoders: the mixed precision's, unless ``frozen_dtype`` says
    otherwise."""
    if cfg.frozen_dtype != "auto":
        return DTYPES[cfg.frozen_dtype]
    return DTYPES.get(cfg.mixed_precision, torch.float32)


def vae_dtype(cfg) -> torch.dtype:
    """The dtype the VAE encodes and decodes in: ``--vae-dtype``, except fp16, which becomes fp32 with a notice
    (:func:`std_hf.devices.vae_dtype_for`); the VAE always runs outside the mixed-precision autocast."""
    dtype, notice = vae_dtype_for(DTYPES[cfg.vae_dtype])
    if notice:
        log.warning(notice)
    return dtype


def cast_frozen(base, dtype: torch.dtype) -> None:
    """The frozen weights of ``base`` (UNet and text encoders) to ``dtype`` in place; LoRA factors (``.lora_``)
    stay fp32."""
    for module in [base.unet, *base.text_encoders]:
        cast_floats(module, dtype, skip=".lora_")
