"""Stylize a batch of clean latents with STD: the chunk loop every front end shares.

An image is a batch of one; a video is a batch of frames, cut into chunks by a :class:`~.chunks.Chunking`
(``frames_per_batch`` frames sharing ``overlap`` frames, each chunk sampled as one batch, overlaps cross-faded),
with the start and step noise of :mod:`.noise`. The ComfyUI nodes, the Gradio app and the batch CLI all run
:func:`stylize_chunks` (a streamed clip runs the same chunk function through :func:`~.stream.stream_stylize`), so
the same seed gives the same noise in every front end. Per-frame tensors that travel with a chunk (inpainting
masks, ControlNet hints) are sliced with :func:`frame_rows`, ComfyUI's broadcast rule: frame ``i`` of an
``n``-frame batch uses row ``i % k`` of a ``k``-row tensor, a single row serves every frame.

Pure torch: :func:`stylize_latents` runs the core sampler on any k-diffusion denoiser
``model(x, sigma, **extra_args) -> x0`` (e.g. a :class:`~.schedules.KDenoiser` around a diffusers UNet with
classifier-free guidance); the ComfyUI nodes hand :func:`stylize_chunks` a chunk function that samples through
ComfyUI's own stack.
"""

from __future__ import annotations

from typing import Callable

import torch

from .chunks import Chunking, blend_chunks
from .errors import STDInputError
from .noise import start_noise, step_noise_sampler
from .sampling import sample_std


def frame_rows(start: int, end: int, rows: int) -> torch.Tensor | None:
    """Rows of a per-frame tensor with ``rows`` rows that frames ``[start, end)`` use (None: the one row serves all)."""
    if rows == 1:
        return None
    return torch.arange(start, end) % rows


def frames_of(tensor: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """The part of a per-frame tensor (mask, hint) for frames ``[start, end)`` (see :func:`frame_rows`)."""
    if tensor is None:
        return None
    rows = frame_rows(start, end, tensor.shape[0])
    return tensor if rows is None else tensor[rows.to(tensor.device)]


def stylize_chunks(latents: torch.Tensor, seed: int, run_chunk: Callable[[int, int, torch.Tensor], torch.Tensor],
                   chunking: Chunking | None = None, *, batch_index=None) -> torch.Tensor:
    """The chunk loop: draw the start noise for every frame, sample each chunk, cross-fade the overlaps.

    Args:
        latents: clean latents ``[N, C, H, W]``.
        seed: seed of the start noise.
        run_chunk: ``run_chunk(start, end, noise) -> stylized latents [end - start, C, H, W]`` for the frames
            ``[start, end)``; ``noise`` is their start noise (add it at the first sigma).
        chunking: frames per chunk, overlap and noise policy (default: the whole batch at once, shared noise).
        batch_index: ComfyUI's per-entry noise indices (per_frame only).

    Returns:
        The stylized latents ``[N, C, H, W]``, float32 on the CPU.
    """
    chunking = chunking or Chunking(None)
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise STDInputError("latents", f"expected a batch of latents [frames, channels, height, width], got shape "
                                       f"{list(latents.shape)}")
    n = latents.shape[0]
    ranges = chunking.ranges(n)
    full_noise = start_noise(latents, seed, chunking.noise, batch_index)
    return blend_chunks(n, ranges, (run_chunk(s, e, full_noise[s:e].contiguous()).float().cpu() for s, e in ranges))


def stylize_latents(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, seed: int,
                    chunking: Chunking | None = None, *, gamma: float = 0.0, schedule=None,
                    extra_args: dict | None = None, callback=None, disable: bool | None = None) -> torch.Tensor:
    """Noise clean latents to ``sigmas[0]`` and run the core STD sampler chunk by chunk (:func:`stylize_chunks`).

    Args:
        denoiser: ``model(x, sigma, **extra_args) -> x0`` in VE coordinates (k-diffusion form).
        latents: clean latents ``[N, C, H, W]`` (VAE latents times the VAE's scaling factor).
        sigmas: descending noise levels, normally ``plan.sigmas(schedule)``.
        seed: seed of the start noise and, with gamma > 0, of the per-step noise.
        chunking: as :func:`stylize_chunks`.
        gamma: per-step stochasticity of the STD step (0 = deterministic).
        schedule: the model's schedule (``sigma(t)`` / ``timestep(sigma)``), needed when gamma > 0.
        callback: called once per sampler step of every chunk (k-diffusion callback dict).

    Returns:
        The stylized latents ``[N, C, H, W]``, float32 on the CPU.
    """
    chunking = chunking or Chunking(None)
    run = std_chunk_runner(denoiser, sigmas, seed, chunking.noise, gamma=gamma, schedule=schedule,
                           extra_args=extra_args, callback=callback, disable=disable)
    return stylize_chunks(latents, seed, lambda s, e, chunk_noise: run(s, e, latents[s:e], chunk_noise), chunking)


def std_chunk_runner(denoiser, sigmas: torch.Tensor, seed: int, noise: str = "shared", *, gamma: float = 0.0,
                     schedule=None, extra_args: dict | None = None, callback=None, disable: bool | None = None):
    """The chunk function of :func:`stylize_latents`: ``run_chunk(start, end, latents, noise) -> stylized latents``
    noises a chunk's clean latents to ``sigmas[0]`` with its start noise and runs the core STD sampler on them (the
    per-step noise, gamma > 0, restarts from ``seed`` for every chunk; ``noise`` is the chunking's noise policy).
    :func:`~.stream.stream_stylize` takes it as is; :func:`stylize_chunks` with the chunk's rows of the latents."""

    def run_chunk(s, e, latents, chunk_noise):
        sig = sigmas.to(latents.device)
        x = latents + sig[0].to(latents.dtype) * chunk_noise.to(latents.device, latents.dtype)
        noise_sampler = step_noise_sampler(x, seed, noise) if gamma > 0 else None
        return sample_std(denoiser, x, sig, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, gamma=gamma, schedule=schedule)

    return run_chunk
