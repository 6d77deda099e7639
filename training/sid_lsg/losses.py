"""SiD-LSG math, pure torch (docs/official-sid-lsg-code.md §2–4).

VP notation: ``x_t = a_t x0 + s_t ε`` with ``a_t = sqrt(ᾱ_t)``, ``s_t = sqrt(1 - ᾱ_t)``; ε-prediction networks.
"""

from __future__ import annotations

import torch

from comfyui_std.core.vp import guidance, per_sample, x0_eps


def guided(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor, kappa: float) -> torch.Tensor:
    """CFG ``ε_u + κ (ε_c - ε_u)``; κ = 1 is the conditional prediction alone (no unconditional pass needed)."""
    if kappa == 1 or eps_uncond is None:
        return eps_cond
    return guidance(eps_uncond, eps_cond, kappa)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Closed-form x̂0 = (x_t - s_t ε̂) / a_t, in float32 (no clipping)."""
    return x0_eps(eps.float(), x_t.float(), alpha_bar)[0]


def generator_input(z: torch.Tensor, alpha_bar_init: torch.Tensor) -> torch.Tensor:
    """The generator's UNet input at t_init: pure noise put through add_noise with x0 = 0, i.e. ``s_init z``."""
    return per_sample((1 - alpha_bar_init).sqrt(), z) * z



def sample_t(batch: int, t_min: int, t_max: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{t_min, …, t_max} per sample (the paper: 20 … 979)."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator)


def fake_score_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Σ over elements of (ε_ψ^{κ1} - ε)², averaged over the batch."""
    return ((eps_pred.float() - eps.float()) ** 2).flatten(1).sum(1).mean()


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float = 1.0,
                       w_min: float = 1e-5) -> torch.Tensor:
    """The SiD generator loss with the per-sample normalisation (only ``w`` is detached).

    ``l = (y_real - y_fake) · [(y_real - x_g) - α (y_real - y_fake)] / w``, ``w = mean |x_g - y_real|`` (no grad,
    at least ``w_min``); summed over elements, averaged over the batch. With α = 1 this is
    ``(y_real - y_fake) · (y_fake - x_g) / w``.
    """
    x_g, y_real, y_fake = x_g.float(), y_real.float(), y_fake.float()
    with torch.no_grad():
        w = (x_g - y_real).abs().flatten(1).mean(1).clamp(min=w_min)
    diff = y_real - y_fake
    per = diff * ((y_real - x_g) - alpha * diff) / per_sample(w, x_g)
    return per.flatten(1).sum(1).mean()


def ema_beta(batch: int, images_seen: int, halflife_kimg: float = 50.0, rampup: float | None = 0.05) -> float:
    """EMA decay per step from a half-life in images, with the ramp-up of the original code."""
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))
