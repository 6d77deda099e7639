"""Frame geometry with one filter policy: how content images and video frames change size.

Every content image or frame that is resized (the nodes' loaders, the app, the batch CLI, the trainer's data) is
resampled by :func:`resize`: antialiased bilinear filtering on float pixels (``torch.nn.functional.interpolate``,
``mode="bilinear", antialias=True, align_corners=False``). Antialiasing keeps downscaled content free of aliasing
(the STD student sees what the VAE would see of a properly filtered photo), bilinear keeps upscaling free of
ringing, and float pixels keep 16-bit sources' levels. Sizes snap to multiples of 8 (the VAE's factor) by
:func:`snap_frame`: center ``crop``, edge ``pad`` or ``stretch``.

The app first reduces an upload above its size limit while decoding it (PIL's draft mode and thumbnail), so an
oversized file never becomes a huge float tensor; from there on the policy above applies.

Two encoders keep their own preprocessing on purpose, because they must see what they were trained on: CLIP vision
for the style reference (bicubic, as ComfyUI's ``clip_preprocess``; ``std_hf.ip_adapter``) and the trainer's DINOv2
discriminator (its own input size; ``training.std.adversarial``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import STDInputError

RESIZE_MODES = ("none", "crop", "pad", "stretch")


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` ``[..., C, H, W]`` (float) resampled to ``size`` = (height, width) by the policy of this module."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    y = x.reshape(-1, *x.shape[-3:])
    y = torch.nn.functional.interpolate(y, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return y.reshape(*lead, *y.shape[-3:])


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Frames ``[N, H, W, 3]`` in 0..1 resized to ``size`` = (width, height)."""
    if (frames.shape[2], frames.shape[1]) == tuple(size):
        return frames
    x = resize(frames.permute(0, 3, 1, 2), (size[1], size[0]))
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of ``height`` x ``width`` scaled, aspect kept, to cover ``target`` (h, w)."""
    th, tw = target
    scale = max(th / height, tw / width)
    return max(th, round(height * scale)), max(tw, round(width * scale))


def fit(frame: np.ndarray, size: tuple[int, int], how: str) -> np.ndarray:
    """Fit a float frame ``[H, W, C]`` to ``size`` = (height, width): ``"crop to first"`` scales it to cover and
    center-crops; anything else stretches."""
    h, w = size
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None]
    if how == "crop to first":
        sh, sw = cover_size(frame.shape[0], frame.shape[1], size)
        t = resize(t, (sh, sw))
        top, left = (sh - h) // 2, (sw - w) // 2
        t = t[..., top:top + h, left:left + w]
    else:
        t = resize(t, (h, w))
    return t[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _snap(size: int, mode: str) -> int:
    if mode == "pad":
        return int(math.ceil(size / 8) * 8)
    if mode == "stretch":
        return max(8, int(round(size / 8) * 8))
    return max(8, (size // 8) * 8)


def snap_frame(frame: np.ndarray, mode: str) -> np.ndarray:
    """Make both sides a multiple of 8: center ``crop``, edge-replicate ``pad``, or ``stretch`` (:func:`resize`);
    ``none`` leaves the frame as it is.

    ``frame`` is ``[H, W, C]``, uint8 (0..255) or float (0..1); the result has its dtype."""
    if mode == "none":
        return frame
    h, w = frame.shape[:2]
    th, tw = _snap(h, mode), _snap(w, mode)
    if (th, tw) == (h, w):
        return frame
    if mode == "crop":
        if h < 8 or w < 8:
            raise STDInputError("resize", f"frames of {w}x{h} are smaller than 8 pixels; use pad or stretch")
        top, left = (h - th) // 2, (w - tw) // 2
        return frame[top:top + th, left:left + tw]
    if mode == "pad":
        return np.pad(frame, ((0, th - h), (0, tw - w), (0, 0)), mode="edge")
    t = resize(torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float(), (th, tw))
    t = t[0].permute(1, 2, 0)
    if frame.dtype == np.uint8:
        return t.round().clamp(0, 255).to(torch.uint8).numpy()
    return t.clamp(0, 1).numpy().astype(frame.dtype)
