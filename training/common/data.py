"""Training data: a folder of images and/or videos with optional same-stem ``.txt`` captions.

Batches are a pure function of (seed, rank, step): the order is a per-epoch permutation and crops/flips come from a
generator seeded with the step, so a resumed run sees exactly the batches the uninterrupted run would have seen.
Unreadable files are skipped (and counted) when the folder is scanned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from comfyui_std.core.video import VIDEO_EXTENSIONS, load_video

log = logging.getLogger("training")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Item:
    path: Path
    caption: str
    video: bool


class DataError(ValueError):
    pass


def scan_folder(folder: str, style_prompt: str = "", videos: bool = False) -> tuple[list[Item], int]:
    """Readable items of ``folder`` (recursively) and the number of unreadable files skipped."""
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data: {folder} is not a folder; give a folder of images (png/jpg/webp) and/or videos")
    items, skipped = [], 0
    for p in sorted(root.rglob("*")):
        suffix = p.suffix.lower()
        if not p.is_file() or suffix not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            continue
        is_video = suffix in VIDEO_EXTENSIONS
        if videos and not is_video:
            continue  # video mode trains on clips only; image mode also takes one random frame of each video
        try:
            if is_video:
                load_video(p, frame_load_cap=1)
            else:
                with Image.open(p) as im:
                    im.verify()
        except Exception as err:  # PIL/PyAV raise many types for corrupt files
            skipped += 1
            log.warning("data: skipping unreadable %s (%s)", p.name, type(err).__name__)
            continue
        cap = p.with_suffix(".txt")
        caption = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.exists() else ""
        if style_prompt:
            caption = f"{caption}, {style_prompt}" if caption else style_prompt
        items.append(Item(p, caption, is_video))
    if not items:
        kinds = "videos" if videos else "images"
        raise DataError(f"data: no readable {kinds} in {root} ({skipped} unreadable file(s) skipped)")
    return items, skipped


def _crop(img: torch.Tensor, size: int, gen: torch.Generator | None, flip: bool) -> torch.Tensor:
    """[C,H,W] or [F,C,H,W] in 0..1 -> short side ``size``, random (or center) square crop, optional flip."""
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = img if img.ndim == 4 else img[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if gen is None:
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        top = int(torch.randint(nh - size + 1, (), generator=gen))
        left = int(torch.randint(nw - size + 1, (), generator=gen))
    x = x[..., top:top + size, left:left + size]
    if flip and gen is not None and torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    return x if img.ndim == 4 else x[0]


def load_pixels(item: Item, size: int, gen: torch.Generator | None, num_frames: int = 0, frame_stride: int = 4,
                flip: bool = True) -> torch.Tensor:
    """Pixels in [-1, 1]: [3,S,S] for an image (or one frame of a video in image mode), [F,3,S,S] for a clip."""
    if item.video:
        cap = num_frames * frame_stride if num_frames else 0
        frames, _ = load_video(item.path, frame_load_cap=cap or 0)
        frames = frames.movedim(-1, 1)
        if num_frames:
            if len(frames) < num_frames:
                raise DataError(f"data: {item.path.name} has {len(frames)} frames, need {num_frames}")
            idx = torch.linspace(0, len(frames) - 1, num_frames).round().long()
            x = frames[idx]
        else:
            k = int(torch.randint(len(frames), (), generator=gen)) if gen is not None else 0
            x = frames[k]
    else:
        from PIL import Image
        import numpy as np
        with Image.open(item.path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)
    return _crop(x, size, gen, flip) * 2 - 1


class StepSampler:
    """Which items a (rank, step) trains on: a fresh permutation per epoch, disjoint slices per rank."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def indices(self, micro_step: int) -> list[int]:
        out = []
        for b in range(self.bs):
            pos = (micro_step * self.bs + b) * self.world + self.rank
            epoch, k = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(int(perm[k]))
        return out
