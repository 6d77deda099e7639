"""A small demo data set made by the project (``--make-demo-data DIR``): a first run needs no pictures of one's own.

Twelve 96×96 PNG images of simple scenes (a coloured shape on a two-colour gradient, a horizon, stripes), each with a
same-stem ``.txt`` caption saying what it shows, drawn from a fixed seed: the same files on every machine. They are
content pictures, not a style; with ``--style-prompt`` or ``--style-lora`` the tiny run shows the whole loop (make
data, train, use the LoRA) in a minute on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.common.errors import TrainingUserError

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle", "horizon", "stripes", "ring")
SIDE = 96
COUNT = 12


class DemoDataError(TrainingUserError, ValueError):
    """The demo data cannot be written where asked."""


def _scene(k: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    names = list(COLOURS)
    shape = SHAPES[k % len(SHAPES)]
    fg, bg1, bg2 = (names[(k * 5 + i) % len(names)] for i in (0, 2, 3))
    t = np.linspace(0, 1, SIDE)[:, None, None]
    image = (1 - t) * np.array(COLOURS[bg1]) + t * np.array(COLOURS[bg2])
    image = np.broadcast_to(image, (SIDE, SIDE, 3)).copy()
    y, x = np.mgrid[:SIDE, :SIDE]
    cy, cx, r = (int(v) for v in rng.integers((30, 30, 14), (66, 66, 26)))
    masks = {"circle": (y - cy) ** 2 + (x - cx) ** 2 < r * r,
             "square": (abs(y - cy) < r) & (abs(x - cx) < r),
             "triangle": (y > cy - r) & (y < cy + r) & (abs(x - cx) < (y - (cy - r)) / 2),
             "horizon": y > cy,
             "stripes": (x // 12) % 2 == 0,
             "ring": abs(np.hypot(y - cy, x - cx) - r) < 4}
    image[masks[shape]] = COLOURS[fg]
    image += rng.normal(0, 6, image.shape)  # a little grain, so no two images are flat copies
    article = "an" if fg[0] in "aeiou" else "a"
    caption = f"{article} {fg} {shape} on a {bg1} and {bg2} background"
    return np.clip(image, 0, 255).astype(np.uint8), caption


def make_demo_data(folder: str | Path) -> Path:
    """Write the demo images and captions into ``folder`` (created; a folder holding other files is refused, so
    nothing of the user's is mixed in or overwritten). Returns the folder."""
    from PIL import Image

    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise DemoDataError(f"make_demo_data: {root} is a file; give a folder")
    names = {f"demo_{k:02d}{ext}" for k in range(COUNT) for ext in (".png", ".txt")}
    if root.is_dir():
        other = sorted(p.name for p in root.iterdir() if p.name not in names)
        if other:
            raise DemoDataError(f"make_demo_data: {root} already holds other files (e.g. {other[0]}); give an empty "
                                "or new folder")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2412)
    for k in range(COUNT):
        pixels, caption = _scene(k, rng)
        Image.fromarray(pixels).save(root / f"demo_{k:02d}.png")
        (root / f"demo_{k:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return root
