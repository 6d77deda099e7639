"""VP diffusion math in one place: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``, per-sample broadcasting, the
x̂0/ε̂ parameterisations and classifier-free guidance.

The samplers work in VE coordinates (:mod:`.schedules`: ``x_VE = x_VP / sqrt(ᾱ)``, ``σ = sqrt((1 - ᾱ) / ᾱ)``); the
trainers (STD's trajectory and jumps, SiD-LSG's losses) and the app's guidance use these VP forms. ``alpha`` is
always ᾱ (``alphas_cumprod``), a scalar or one value per sample.
"""

from __future__ import annotations

import torch

from .errors import STDInputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a scalar or one value per sample) shaped to broadcast over ``like`` ``[N, ...]``, in its dtype and
    on its device."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value if value.ndim == 0 else value.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha) -> torch.Tensor:
    """``sqrt(ᾱ) x0 + sqrt(1 - ᾱ) noise``: forward noising to ᾱ, and equally the DDIM jump from (x̂0, ε̂) to ᾱ."""
    alpha = torch.as_tensor(alpha)
    return per_sample(alpha.sqrt(), x0) * x0 + per_sample((1 - alpha).sqrt(), x0) * noise


def x0_eps(model_output: torch.Tensor, x: torch.Tensor, alpha, prediction_type: str = "epsilon"):
    """(x̂0, ε̂) from a network output at the VP state ``x`` with ᾱ ``alpha``."""
    alpha = torch.as_tensor(alpha)
    a, s = per_sample(alpha.sqrt(), x), per_sample((1 - alpha).sqrt(), x)
    if prediction_type == "epsilon":
        return (x - s * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * x - s * model_output, s * x + a * model_output
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / s
    raise STDInputError("prediction_type", f"got {prediction_type!r}, supported: {', '.join(PREDICTION_TYPES)}")


def guidance(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance ``u + scale (c - u)`` (a scalar or one scale per sample). LCM's and STD's
    "w" is ``scale - 1`` (``c + w (c - u)``); SiD-LSG's κ is the scale."""
    return uncond + per_sample(scale, cond) * (cond - uncond)
