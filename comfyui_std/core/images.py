"""Still images in: exact mode conversion and folders of images as one batch (Pillow + torch; no ComfyUI).

* :func:`image_to_float` turns any image Pillow opens into float RGB in 0..1 without clipping: 16-bit and 32-bit
  integer images are scaled by their bit depth (a 16-bit PNG is not 99 % white), float images by their range,
  palette/CMYK/grey images through RGB (ICC profiles to sRGB); the alpha channel is returned separately (ComfyUI's
  convention: the mask is ``1 - alpha``). EXIF orientation is applied. The nodes and the Gradio app both use it.
* :func:`load_image_folder` reads a folder of images as one ``[N, H, W, 3]`` batch with a cap, a skip, a sort order
  and an explicit rule for images of another size (refuse, or crop/stretch them to the first image's size), and says
  what it did.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import STDInputError, check_range
from .folders import folder_files
from .frames import RESIZE_MODES, fit, snap_frame

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: the EXIF tag of the orientation; values 5-8 show the stored pixels turned by 90 degrees
EXIF_ORIENTATION = 0x0112

SORT_ORDERS = ("name", "natural", "modified")
MISMATCH_MODES = ("refuse", "crop to first", "stretch to first")
#: images larger than this many pixels are refused before decoding (decompression bombs)
MAX_PIXELS = 100_000_000


def _grey_levels(values: np.ndarray, label: str, what: str, notices: list[str]) -> np.ndarray:
    """Grey levels in 0..1 from 16-bit, 32-bit integer or float samples, mapped by the format's range (never
    clipped): 16-bit by 0..65535; 32-bit integers and floats by the nominal range their values fit (0..1 for floats,
    0..255, 0..65535), else by their own min..max (announced)."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise STDInputError(what, f"the image ({label}) has NaN or infinite pixels")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if label.startswith("16-bit"):
        scale_lo, scale_hi = 0.0, 65535.0
    elif lo >= 0 and hi <= 1.0 and label.startswith("32-bit float"):
        scale_lo, scale_hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        scale_lo, scale_hi = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        scale_lo, scale_hi = 0.0, 65535.0
    else:
        scale_lo, scale_hi = lo, hi if hi > lo else lo + 1.0
    if not label.startswith("16-bit"):
        notices.append(f"The {what} has {label} pixels: values {scale_lo:g}..{scale_hi:g} were mapped to 0..255.")
    return ((values - scale_lo) / (scale_hi - scale_lo)).clip(0.0, 1.0).astype(np.float32)


_HIGH_DEPTH = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float"}


def image_to_float(image, what: str = "image") -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(rgb [H, W, 3] float32 0..1, alpha [H, W] float32 0..1 or None, notices)`` of a PIL image, converted by
    meaning rather than by clipping.

    EXIF orientation is applied; 16-bit, 32-bit integer and float images keep their levels (:func:`_grey_levels`);
    palette, grey, CMYK and alpha images go through RGB, with the alpha channel returned (not composited: ComfyUI
    makes its mask from it, the app places it on white); CMYK and RGB images with an embedded non-sRGB ICC profile go
    through a colour transform to sRGB. ``notices`` say what was mapped, for the user.
    """
    from PIL import ImageCms, ImageOps

    image = ImageOps.exif_transpose(image)
    notices: list[str] = []
    mode, alpha = image.mode, None
    if mode in _HIGH_DEPTH:
        grey = _grey_levels(np.asarray(image), _HIGH_DEPTH[mode], what, notices)
        return torch.from_numpy(np.repeat(grey[..., None], 3, axis=2)), None, notices
    if mode in ("RGBA", "LA", "RGBa", "PA", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = torch.from_numpy(np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0)
        rgb_image = rgba.convert("RGB")
    else:
        rgb_image = image.convert("RGB")
        icc = image.info.get("icc_profile")
        if icc and mode in ("CMYK", "RGB"):
            try:
                import io

                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                if mode == "CMYK" or "srgb" not in ImageCms.getProfileDescription(source).lower().replace(" ", ""):
                    rgb_image = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"),
                                                          outputMode="RGB")
            except (ImageCms.PyCMSError, OSError, ValueError):
                notices.append(f"The {what}'s colour profile could not be read: its colours were taken as they are.")
    rgb = torch.from_numpy(np.asarray(rgb_image, dtype=np.float32) / 255.0)
    return rgb, alpha, notices


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass
class FolderInfo:
    names: list[str]                      # the files in the batch, in order
    total: int                            # images in the folder
    width: int
    height: int
    adjusted: list[str] = field(default_factory=list)  # files cropped/stretched to the first image's size

    def describe(self) -> str:
        text = f"{len(self.names)} of {self.total} images, {self.width}x{self.height}"
        if self.adjusted:
            text += f"; {len(self.adjusted)} of another size fitted to the first ({', '.join(self.adjusted[:3])}" + \
                    (", ..." if len(self.adjusted) > 3 else "") + ")"
        return text


def load_image_folder(folder, image_load_cap: int = 0, skip_first_images: int = 0, sort: str = "natural",
                      resize: str = "none", mismatch: str = "refuse") -> tuple[torch.Tensor, torch.Tensor, FolderInfo]:
    """Read the images of ``folder`` (not recursive) as one batch ``[N, H, W, 3]`` float32 in 0..1, with their
    alpha channels ``[N, H, W]`` (1 where an image has none), fitted and resized exactly like the pixels.

    Args:
        folder: the folder.
        image_load_cap: keep at most this many images (0 = all).
        skip_first_images: skip this many images first (in sort order).
        sort: ``name`` (code points), ``natural`` (``img2`` before ``img10``) or ``modified`` (oldest first).
        resize: make sides multiples of 8 after fitting: ``none``, ``crop``, ``pad`` or ``stretch``.
        mismatch: what to do with images whose size differs from the first one's: ``refuse`` (an error naming the
            file), ``crop to first`` (scale to cover and center-crop) or ``stretch to first``.
    """
    from PIL import Image, UnidentifiedImageError

    cap = check_range("image_load_cap", image_load_cap, 0, 1_000_000, kind=int)
    skip = check_range("skip_first_images", skip_first_images, 0, 10_000_000, kind=int)
    for name, value, allowed in (("sort", sort, SORT_ORDERS), ("resize", resize, RESIZE_MODES),
                                 ("mismatch", mismatch, MISMATCH_MODES)):
        if value not in allowed:
            raise STDInputError(name, f"got {value!r}, choose one of {', '.join(allowed)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise STDInputError("folder", f"'{folder.name}' is not a folder")
    files = folder_files(folder, IMAGE_EXTENSIONS)
    if sort == "modified":
        files.sort(key=lambda p: (os.stat(p).st_mtime_ns, p.name))
    else:
        files.sort(key=(lambda p: _natural_key(p.name)) if sort == "natural" else (lambda p: p.name))
    if not files:
        raise STDInputError("folder", f"'{folder.name}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
    chosen = files[skip:skip + cap] if cap else files[skip:]
    if not chosen:
        raise STDInputError("skip_first_images", f"'{folder.name}' has {len(files)} images; skipping {skip} leaves none")
    frames, adjusted, size = [], [], None
    for path in chosen:
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise STDInputError("folder", f"'{path.name}' is {im.width}x{im.height}, above the "
                                                  f"{MAX_PIXELS // 1_000_000}-megapixel limit")
                rgb, alpha, _ = image_to_float(im, f"'{path.name}'")
        except STDInputError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
            raise STDInputError("folder", f"could not read '{path.name}': {type(err).__name__}") from None
        alpha = torch.ones(rgb.shape[:2]) if alpha is None else alpha
        arr = torch.cat([rgb, alpha[..., None]], dim=2).numpy()
        if size is None:
            size = arr.shape[:2]
        elif arr.shape[:2] != size:
            if mismatch == "refuse":
                raise STDInputError("folder", f"'{path.name}' is {arr.shape[1]}x{arr.shape[0]} but the first image "
                                              f"is {size[1]}x{size[0]}; choose mismatch 'crop to first' or 'stretch "
                                              "to first' to fit it")
            arr = fit(arr, size, mismatch)
            adjusted.append(path.name)
        frames.append(arr)
    batch = torch.stack([torch.from_numpy(np.ascontiguousarray(snap_frame(arr, resize))) for arr in frames])
    info = FolderInfo([p.name for p in chosen], len(files), batch.shape[2], batch.shape[1], adjusted)
    return batch[..., :3].contiguous(), batch[..., 3].contiguous(), info
