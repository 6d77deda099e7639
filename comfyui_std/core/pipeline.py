"""Stylize a batch of clean latents with STD: the noise policy and the chunked loop the front ends share.

An image is a batch of one; a video is a batch of frames, cut into chunks of ``frames_per_batch`` that share
``overlap`` frames, each chunk sampled as one batch, overlaps cross-faded (:mod:`.video`). The noise follows the
conventions of the ComfyUI nodes, so the same seed gives the same noise in every front end:

* the start noise is ``torch.randn`` on the CPU from a generator seeded with ``seed`` (ComfyUI's
  ``prepare_noise``); with ``noise = "shared"`` it is drawn for one frame and repeated for every frame, so static
  regions of a video stay identical from frame to frame;
* with gamma > 0 the per-step noise of the STD step is drawn from a generator seeded with ``seed`` on the latent's
  device, once for one frame and repeated (shared) or for the whole chunk (per_frame), restarting for every chunk.

Pure torch: the denoiser is any k-diffusion callable ``model(x, sigma, **extra_args) -> x0``, e.g. a
:class:`~.schedules.KDenoiser` around a diffusers UNet with classifier-free guidance.
"""

from __future__ import annotations

import torch

from .errors import STDInputError
from .sampling import default_noise_sampler, sample_std
from .video import blend_chunks, chunk_ranges

NOISE_MODES = ("shared", "per_frame")


def check_noise_mode(noise: str) -> str:
    if noise not in NOISE_MODES:
        raise STDInputError("noise", f"got {noise!r}, choose one of {', '.join(NOISE_MODES)}")
    return noise


def start_noise(latents: torch.Tensor, seed: int, noise: str = "shared") -> torch.Tensor:
    """The noise added at the plan's first sigma, float32 on the CPU, shaped like ``latents`` ``[N, C, H, W]``."""
    generator = torch.Generator().manual_seed(int(seed))
    if check_noise_mode(noise) == "shared":
        one = torch.randn((1, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        return one.expand(latents.shape[0], *one.shape[1:])
    return torch.randn(tuple(latents.shape), generator=generator, dtype=torch.float32)


def step_noise_sampler(x: torch.Tensor, seed: int, noise: str = "shared"):
    """Per-step noise for the STD step when gamma > 0: one draw per step, repeated over frames when shared."""
    if check_noise_mode(noise) == "shared":
        one = default_noise_sampler(x[:1], seed)
        return lambda sigma, sigma_next: one(sigma, sigma_next).expand_as(x)
    return default_noise_sampler(x, seed)


def stylize_latents(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, seed: int, *, gamma: float = 0.0,
                    noise: str = "shared", frames_per_batch: int | None = None, overlap: int = 0, schedule=None,
                    extra_args: dict | None = None, callback=None, disable: bool | None = None) -> torch.Tensor:
    """Noise clean latents to ``sigmas[0]`` and run the STD sampler chunk by chunk.

    Args:
        denoiser: ``model(x, sigma, **extra_args) -> x0`` in VE coordinates (k-diffusion form).
        latents: clean latents ``[N, C, H, W]`` (VAE latents times the VAE's scaling factor).
        sigmas: descending noise levels, normally ``plan.sigmas(schedule)``.
        seed: seed of the start noise and, with gamma > 0, of the per-step noise.
        gamma: per-step stochasticity of the STD step (0 = deterministic).
        noise: ``"shared"`` (one noise for every frame) or ``"per_frame"``.
        frames_per_batch: frames sampled together (``None`` = all at once).
        overlap: frames shared by consecutive chunks, cross-faded.
        schedule: the model's schedule (``sigma(t)`` / ``timestep(sigma)``), needed when gamma > 0.
        callback: called once per sampler step of every chunk (k-diffusion callback dict).

    Returns:
        The stylized latents ``[N, C, H, W]``, float32 on the CPU.
    """
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise STDInputError("latents", f"expected a batch of latents [frames, channels, height, width], got shape "
                                       f"{list(latents.shape)}")
    n = latents.shape[0]
    ranges = chunk_ranges(n, frames_per_batch or n, overlap)
    full_noise = start_noise(latents, seed, noise)
    sigmas = sigmas.to(latents.device)
    chunks = []
    for s, e in ranges:
        x = latents[s:e] + sigmas[0].to(latents.dtype) * full_noise[s:e].to(latents.device, latents.dtype)
        noise_sampler = step_noise_sampler(x, seed, noise) if gamma > 0 else None
        out = sample_std(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                         noise_sampler=noise_sampler, gamma=gamma, schedule=schedule)
        chunks.append(out.float().cpu())
    return blend_chunks(n, ranges, chunks)
