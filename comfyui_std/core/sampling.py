"""Few-step samplers in k-diffusion form.

Every sampler has the k-diffusion / ComfyUI signature::

    sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

``model(x, sigma, **extra_args)`` returns the denoised estimate x0 (after CFG), ``x`` lives in VE coordinates
(``x = x0 + sigma * eps``) and ``sigmas`` is descending, normally ending in 0. ``callback`` receives
``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step, which is how ComfyUI drives its progress bar,
latent previews and interrupts.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from .errors import check_range
from .schedules import DiscreteSchedule

_DEFAULT_SCHEDULE = None


def default_schedule() -> DiscreteSchedule:
    """The SD1.x/SDXL schedule, used when a sampler is given no ``schedule``."""
    global _DEFAULT_SCHEDULE
    if _DEFAULT_SCHEDULE is None:
        _DEFAULT_SCHEDULE = DiscreteSchedule()
    return _DEFAULT_SCHEDULE


def default_noise_sampler(x: torch.Tensor, seed: int | None = None):
    """Fresh Gaussian noise shaped like ``x`` from a generator seeded once (k-diffusion convention)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


def _seed_from(extra_args) -> int | None:
    return extra_args.get("seed") if extra_args else None


@torch.no_grad()
def sample_std(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               gamma: float = 0.0, schedule=None):
    """STD / TCD multistep consistency sampler.

    Each step predicts x0 and eps at ``sigma_i``, jumps along the predicted trajectory to the level ``s`` with
    ``t_s = floor((1 - gamma) * t_{i+1})`` and, when ``gamma > 0``, re-noises from ``s`` to ``sigma_{i+1}`` with
    fresh noise. ``gamma = 0`` (the default, and what the official STD inference runs) is a deterministic DDIM step,
    identical to Euler; ``gamma = 1`` jumps to x0 each step and re-noises fully (LCM-like).

    Args:
        gamma: per-step stochasticity in [0, 1] (diffusers calls it ``eta`` in ``TCDScheduler.step``).
        schedule: object with ``sigma(t)`` and ``timestep(sigma)`` (a :class:`DiscreteSchedule` or ComfyUI
            ``model_sampling``), used to find ``t_s``; defaults to the SD schedule.
        noise_sampler: ``f(sigma, sigma_next) -> noise``; defaults to a generator seeded from ``extra_args["seed"]``.
    """
    gamma = check_range("gamma", gamma, 0.0, 1.0)
    extra_args = {} if extra_args is None else extra_args
    schedule = default_schedule() if schedule is None else schedule
    if gamma > 0 and noise_sampler is None:
        noise_sampler = default_noise_sampler(x, _seed_from(extra_args))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        eps = (x - denoised) / sigma
        if gamma == 0:
            x = denoised + sigma_next * eps
            continue
        t_next = schedule.timestep(sigma_next.reshape(1).to(torch.float32)).long().cpu()
        t_s = torch.floor((1 - gamma) * t_next)
        sigma_s = torch.minimum(schedule.sigma(t_s).float().cpu(), sigma_next.reshape(1).float().cpu())
        sigma_s = sigma_s.to(x.device, x.dtype).reshape(())
        x = denoised + sigma_s * eps
        noise = noise_sampler(sigma, sigma_next)
        x = x + (sigma_next ** 2 - sigma_s ** 2).clamp(min=0) ** 0.5 * noise
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """LCM multistep sampler: jump to x0, then re-noise to the next level with fresh noise."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, _seed_from(extra_args))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_onestep(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """One network evaluation at ``sigmas[0]``; returns the denoised estimate (one-step generators, SiD-LSG).

    Any further sigmas are ignored: the generator maps its input level straight to x0.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": sigmas[0], "sigma_hat": sigmas[0], "denoised": denoised})
    return denoised


SAMPLERS = {"std": sample_std, "lcm": sample_lcm, "onestep": sample_onestep}
