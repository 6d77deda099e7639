"""Stylize a batch of clean latents with STD: the noise policy and the chunk loop every front end shares.

An image is a batch of one; a video is a batch of frames, cut into chunks of ``frames_per_batch`` that share
``overlap`` frames, each chunk sampled as one batch, overlaps cross-faded (:mod:`.video`). The ComfyUI nodes, the
Gradio app and the trainer's previews all run :func:`stylize_chunks`, so the same seed gives the same noise in every
front end:

* the start noise (:func:`start_noise`) is ComfyUI's ``prepare_noise``: ``torch.randn`` on the CPU from a
  generator seeded with ``seed``, in the latent's dtype, one draw per ``batch_index`` entry when the latent carries
  one; with ``noise = "shared"`` it is drawn for one frame and repeated for every frame, so static regions of a
  video stay identical from frame to frame;
* with gamma > 0 the per-step noise of the STD step (:func:`step_noise_sampler`) is drawn from a generator seeded
  with ``seed`` on the latent's device, once for one frame and repeated (shared) or for the whole chunk
  (per_frame), restarting for every chunk;
* a streamed clip (:mod:`.stream`) draws the same start noise a few frames at a time (:class:`StartNoise`) and runs
  the same chunk function (:func:`std_chunk_runner`), so streamed and in-memory outputs are identical;
* per-frame tensors that travel with a chunk (inpainting masks, ControlNet hints) are sliced with
  :func:`frame_rows`, ComfyUI's broadcast rule: frame ``i`` of an ``n``-frame batch uses row ``i % k`` of a ``k``-row
  tensor, a single row serves every frame.

Pure torch: :func:`stylize_latents` runs the core sampler on any k-diffusion denoiser
``model(x, sigma, **extra_args) -> x0`` (e.g. a :class:`~.schedules.KDenoiser` around a diffusers UNet with
classifier-free guidance); the ComfyUI nodes hand :func:`stylize_chunks` a chunk function that samples through
ComfyUI's own stack.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import STDInputError
from .sampling import default_noise_sampler, sample_std
from .video import blend_chunks, chunk_ranges

NOISE_MODES = ("shared", "per_frame")


def check_noise_mode(noise: str) -> str:
    if noise not in NOISE_MODES:
        raise STDInputError("noise", f"got {noise!r}, choose one of {', '.join(NOISE_MODES)}")
    return noise


def start_noise(latents: torch.Tensor, seed: int, noise: str = "shared", batch_index=None) -> torch.Tensor:
    """The noise added at the plan's first sigma, on the CPU in the latents' dtype, shaped like ``latents``.

    ``per_frame`` with ``batch_index`` follows ComfyUI: one ``[1, ...]`` draw per index up to the largest, entry
    ``b`` taking the draw of ``batch_index[b]`` (so a batch split into several latents keeps its noise).
    """
    generator = torch.Generator().manual_seed(int(seed))
    dtype = latents.dtype if latents.is_floating_point() else torch.float32
    one_shape = (1, *latents.shape[1:])
    if check_noise_mode(noise) == "shared":
        one = torch.randn(one_shape, generator=generator, dtype=dtype)
        return one.expand(latents.shape[0], *one.shape[1:])
    if batch_index is None:
        return torch.randn(tuple(latents.shape), generator=generator, dtype=dtype)
    index = [int(i) for i in batch_index]
    if len(index) != latents.shape[0] or min(index) < 0:
        raise STDInputError("batch_index", f"expected {latents.shape[0]} non-negative indices, got {index}")
    draws = [torch.randn(one_shape, generator=generator, dtype=dtype) for _ in range(max(index) + 1)]
    return torch.cat([draws[i] for i in index])


class StartNoise:
    """The start noise of :func:`start_noise` (without ``batch_index``), drawn a few frames at a time for streaming.

    ``frames(start, end)`` returns exactly ``start_noise(latents, seed, noise)[start:end]`` for a clip of ``total``
    frames without drawing the whole clip's noise at once, so memory does not grow with the clip length:

    * ``shared``: one frame is drawn and repeated (no state);
    * ``per_frame``: the full draw is one ``torch.randn((total, C, H, W))`` on the CPU. Its values do not depend on
      how the draw is split as long as every piece but the last holds a multiple of 16 values: the CPU normal
      sampler turns uniforms into normals in blocks of 16 (Box-Muller on 8 pairs), and when the size is not a
      multiple of 16 it redraws the *last* 16 values with 16 fresh uniforms; a draw of fewer than 16 values takes
      another (scalar) path. So the frames are drawn in groups of :attr:`group` frames (the fewest whose size is a
      multiple of 16: 1 frame when C*H*W is, at most 16), and the tail - the last ``total % group`` frames plus one
      more group, fewer than ``2 * group`` frames - in one final draw that starts on a 16-value boundary and holds at
      least 16 values, exactly as the full draw computes it (its recomputed last block included). This needs
      ``total`` once fewer than ``2 * group`` frames remain after the last group drawn: pass it as soon as it is
      known; while it is unknown the caller must know that at least ``end + 2 * group`` frames exist
      (:func:`~.stream.stream_stylize` reads that far ahead). A call that breaks this raises ``RuntimeError``
      rather than return different noise.

    Frames before ``start`` of the latest call may be dropped with :meth:`release`.
    """

    def __init__(self, frame_shape, seed: int, noise: str = "shared", dtype: torch.dtype = torch.float32):
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.noise = check_noise_mode(noise)
        self.dtype = dtype if dtype.is_floating_point else torch.float32
        self.generator = torch.Generator().manual_seed(int(seed))
        size = math.prod(self.frame_shape)
        self.group = 16 // math.gcd(size, 16)
        self._shared = (torch.randn((1, *self.frame_shape), generator=self.generator, dtype=self.dtype)
                        if self.noise == "shared" else None)
        self._parts: list[torch.Tensor] = []  # drawn frames [self._first, self._drawn)
        self._first = 0
        self._drawn = 0
        self._min_total = 0  # the group draws so far are exact for clips of at least this many frames
        self._final = False

    def _draw(self, frames: int) -> None:
        self._parts.append(torch.randn((frames, *self.frame_shape), generator=self.generator, dtype=self.dtype))
        self._drawn += frames

    def frames(self, start: int, end: int, total: int | None = None) -> torch.Tensor:
        """Noise ``[end - start, *frame_shape]`` of frames ``[start, end)`` of a ``total``-frame clip."""
        if not 0 <= start < end or (total is not None and end > total):
            raise ValueError(f"frames [{start}, {end}) of a {total}-frame clip")
        if self._shared is not None:
            return self._shared.expand(end - start, *self.frame_shape).contiguous()
        if start < self._first:
            raise RuntimeError(f"noise of frame {start} was released (frames from {self._first} are kept)")
        if total is not None:
            exact = (total * math.prod(self.frame_shape)) % 16 == 0
            if total < self._drawn or (not exact and total < self._min_total):
                raise RuntimeError(f"the noise was drawn ahead for a clip of at least {self._min_total} frames, "
                                   f"but it has {total}")
        while self._drawn < end:
            if self._final:
                raise RuntimeError("the clip's noise is complete")
            rest = None if total is None else total - self._drawn
            if rest is not None and rest < 2 * self.group:
                self._draw(rest)
                self._final = True
            else:
                self._min_total = max(self._min_total, self._drawn + 2 * self.group)
                self._draw(self.group)
        parts = self._parts if len(self._parts) == 1 else [torch.cat(self._parts)]
        self._parts = parts
        return parts[0][start - self._first:end - self._first].clone()

    def release(self, before: int) -> None:
        """Forget the noise of frames before ``before`` (they will not be asked for again)."""
        if self._shared is not None or before <= self._first:
            return
        whole = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
        cut = min(before, self._drawn) - self._first
        self._parts = [whole[cut:].clone()]
        self._first += cut


def step_noise_sampler(x: torch.Tensor, seed: int | None, noise: str = "shared"):
    """Per-step noise for the STD step when gamma > 0: one draw per step, repeated over frames when shared."""
    if check_noise_mode(noise) == "shared":
        one = default_noise_sampler(x[:1], seed)
        return lambda sigma, sigma_next: one(sigma, sigma_next).expand_as(x)
    return default_noise_sampler(x, seed)


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


def stylize_chunks(latents: torch.Tensor, seed: int, run_chunk: Callable[[int, int, torch.Tensor], torch.Tensor], *,
                   noise: str = "shared", frames_per_batch: int | None = None, overlap: int = 0,
                   batch_index=None) -> torch.Tensor:
    """The chunk loop: draw the start noise for every frame, sample each chunk, cross-fade the overlaps.

    Args:
        latents: clean latents ``[N, C, H, W]``.
        seed: seed of the start noise.
        run_chunk: ``run_chunk(start, end, noise) -> stylized latents [end - start, C, H, W]`` for the frames
            ``[start, end)``; ``noise`` is their start noise (add it at the first sigma).
        noise: ``"shared"`` (one noise for every frame) or ``"per_frame"``.
        frames_per_batch: frames sampled together (``None`` = all at once).
        overlap: frames shared by consecutive chunks, cross-faded.
        batch_index: ComfyUI's per-entry noise indices (per_frame only).

    Returns:
        The stylized latents ``[N, C, H, W]``, float32 on the CPU.
    """
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise STDInputError("latents", f"expected a batch of latents [frames, channels, height, width], got shape "
                                       f"{list(latents.shape)}")
    n = latents.shape[0]
    ranges = chunk_ranges(n, frames_per_batch or n, overlap)
    full_noise = start_noise(latents, seed, noise, batch_index)
    return blend_chunks(n, ranges, (run_chunk(s, e, full_noise[s:e].contiguous()).float().cpu() for s, e in ranges))


def stylize_latents(denoiser, latents: torch.Tensor, sigmas: torch.Tensor, seed: int, *, gamma: float = 0.0,
                    noise: str = "shared", frames_per_batch: int | None = None, overlap: int = 0, schedule=None,
                    extra_args: dict | None = None, callback=None, disable: bool | None = None) -> torch.Tensor:
    """Noise clean latents to ``sigmas[0]`` and run the core STD sampler chunk by chunk (:func:`stylize_chunks`).

    Args:
        denoiser: ``model(x, sigma, **extra_args) -> x0`` in VE coordinates (k-diffusion form).
        latents: clean latents ``[N, C, H, W]`` (VAE latents times the VAE's scaling factor).
        sigmas: descending noise levels, normally ``plan.sigmas(schedule)``.
        seed: seed of the start noise and, with gamma > 0, of the per-step noise.
        gamma: per-step stochasticity of the STD step (0 = deterministic).
        noise, frames_per_batch, overlap: as :func:`stylize_chunks`.
        schedule: the model's schedule (``sigma(t)`` / ``timestep(sigma)``), needed when gamma > 0.
        callback: called once per sampler step of every chunk (k-diffusion callback dict).

    Returns:
        The stylized latents ``[N, C, H, W]``, float32 on the CPU.
    """
    run = std_chunk_runner(denoiser, sigmas, seed, gamma=gamma, noise=noise, schedule=schedule,
                           extra_args=extra_args, callback=callback, disable=disable)
    return stylize_chunks(latents, seed, lambda s, e, chunk_noise: run(s, e, latents[s:e], chunk_noise), noise=noise,
                          frames_per_batch=frames_per_batch, overlap=overlap)


def std_chunk_runner(denoiser, sigmas: torch.Tensor, seed: int, *, gamma: float = 0.0, noise: str = "shared",
                     schedule=None, extra_args: dict | None = None, callback=None, disable: bool | None = None):
    """The chunk function of :func:`stylize_latents`: ``run_chunk(start, end, latents, noise) -> stylized latents``
    noises a chunk's clean latents to ``sigmas[0]`` with its start noise and runs the core STD sampler on them (the
    per-step noise, gamma > 0, restarts from ``seed`` for every chunk). :func:`~.stream.stream_stylize` takes it
    as is; :func:`stylize_chunks` with the chunk's rows of the latents."""
    check_noise_mode(noise)

    def run_chunk(s, e, latents, chunk_noise):
        sig = sigmas.to(latents.device)
        x = latents + sig[0].to(latents.dtype) * chunk_noise.to(latents.device, latents.dtype)
        noise_sampler = step_noise_sampler(x, seed, noise) if gamma > 0 else None
        return sample_std(denoiser, x, sig, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, gamma=gamma, schedule=schedule)

    return run_chunk
