"""The noise policy every front end shares: the start noise of a run and the per-step noise of the STD step.

* the start noise (:func:`start_noise`) is ComfyUI's ``prepare_noise``: ``torch.randn`` on the CPU from a
  generator seeded with ``seed``, in the latent's dtype, one draw per ``batch_index`` entry when the latent carries
  one; with ``noise = "shared"`` it is drawn for one frame and repeated for every frame, so static regions of a
  video stay identical from frame to frame;
* a streamed clip (:mod:`.stream`) draws the same start noise a few frames at a time (:class:`StartNoise`), so
  streamed and in-memory outputs are identical;
* with gamma > 0 the per-step noise of the STD step (:func:`step_noise_sampler`) is drawn from a generator seeded
  with ``seed`` on the latent's device, once for one frame and repeated (shared) or for the whole chunk
  (per_frame), restarting for every chunk.
"""

from __future__ import annotations

import math

import torch

from .errors import STDInputError
from .sampling import default_noise_sampler

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
