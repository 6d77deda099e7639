"""Reading uploads, sizing frames and writing results (PNG with the settings in its metadata, mp4).

Uploads are untrusted: a client (the browser or any API client) sends a file *path* in its payload, and the app reads
only paths that Gradio itself wrote when it received an upload (``POST /upload``). Anything else, a path elsewhere on
the server, ``../`` tricks, a symlink or a copy placed in Gradio's cache folder, a URL, is refused with one message
that does not depend on whether the file exists (:func:`checked_upload`). The app ships no examples; examples would
have to be added to the allow-list by the app itself, not taken from Gradio's caches.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from comfyui_std.core import STDInputError, STDPlan
from comfyui_std.core.frames import resize_frames
from comfyui_std.core.images import EXIF_ORIENTATION, image_to_float

#: what PIL is allowed to decode at all (pixels); larger files are refused before decoding (decompression bombs)
MAX_DECODE_PIXELS = 100_000_000
#: the smallest side an input may have; below it there is nothing sensible to stylize
MIN_SOURCE_SIDE = 8
#: an output whose aspect ratio differs from the input's by more than this factor is announced as squashed
ASPECT_TOLERANCE = 1.05
IMAGE_FORMATS = "PNG, JPEG, WebP, BMP, TIFF, GIF"


#: the smallest long side a run stylizes (smaller frames give latents the UNet cannot downsample: a torch error)
MIN_SIDE = 32

def refused(what: str) -> STDInputError:
    """The one answer for a file that was not uploaded to this app (the same whether or not it exists)."""
    return STDInputError(what, "only files uploaded to this app can be used: upload the file (paths on the server "
                               "and URLs are not accepted)")


def payload_path(payload):
    """The path a payload names: a Gradio ``FileData`` dict, a ``VideoData`` dict ("video"), or a plain string;
    ``None`` when nothing was sent. Other types are returned as they are (and refused by the caller)."""
    if isinstance(payload, dict) and isinstance(payload.get("video"), dict):
        payload = payload["video"]
    if isinstance(payload, dict):
        payload = payload.get("path")
    if payload is None or payload == "":
        return None
    return payload


def _normal(path: str) -> str:
    return os.path.normcase(os.path.normpath(os.path.abspath(path)))


def received_files(blocks) -> set[str]:
    """Normalised paths of every file ``blocks`` (a running ``gr.Blocks``) received as an upload: Gradio records each
    file that ``POST /upload`` writes into its cache folder in ``Blocks.upload_file_set``.

    Deliberately not the cache folder as a whole, nor the components' ``temp_files``: while preprocessing a payload
    marked as Gradio ``FileData``, Gradio adds any path inside its cache folder to the component's ``temp_files``
    as it is, and downloads URLs into the cache, so both hold files a client merely named.
    """
    files = set(blocks.upload_file_set)  # a C-level copy: safe while the server thread adds to it
    return {_normal(f) for f in files}


def checked_upload(payload, what: str, allowed: set[str] | None) -> Path:
    """The file behind an upload, if ``allowed`` (from :func:`received_files`) holds it.

    The path is compared as sent (normalised, symlinks *not* followed), so ``cache/../../etc/passwd`` or a link
    placed anywhere is not in the set. ``allowed=None`` trusts the caller (in-process use, never the server).
    """
    raw = payload_path(payload)
    if raw is None:
        raise STDInputError(what, "nothing was uploaded: add one first")
    if not isinstance(raw, (str, os.PathLike)):
        raise refused(what)
    raw = os.fspath(raw)
    if allowed is not None:
        if "://" in raw or "\x00" in raw or _normal(raw) not in allowed:
            raise refused(what)
        path = Path(_normal(raw))
        if path.is_symlink():
            raise refused(what)
    else:
        path = Path(raw)
    if not path.is_file():
        raise STDInputError(what, f"the upload '{path.name}' is gone (the app's upload cache was cleared); upload it "
                                  "again")
    return path


def scrub(message: str, path: Path) -> str:
    """``message`` without the server-side folder of ``path`` (errors from PIL and PyAV quote full paths)."""
    return message.replace(str(path), path.name).replace(str(path.parent) + os.sep, "")


# Pixels -----------------------------------------------------------------------------------------------------------
def to_rgb(im: Image.Image, what: str) -> tuple[Image.Image, list[str]]:
    """Any PIL mode as 8-bit sRGB, converted by its meaning (the core's :func:`image_to_float`: 16-bit and float
    levels kept, ICC profiles to sRGB); transparent pixels are placed on white (announced)."""
    rgb, alpha, notices = image_to_float(im, what)
    if alpha is not None and float(alpha.min()) < 1.0:
        rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])
        notices.append(f"The {what} has transparent pixels: they were placed on white.")
    data = (rgb * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(data, "RGB"), notices


def read_image(path: Path, what: str, max_side: int) -> tuple[Image.Image, list[str], tuple[int, int]]:
    """Open an uploaded image as RGB (EXIF orientation applied, any mode converted by :func:`to_rgb`).

    Returns the image, notices for the user and the file's own size. Images whose long side exceeds ``max_side`` are
    downscaled to it (with a notice); files that are not images, too large to decode safely or smaller than
    ``MIN_SOURCE_SIDE`` raise :class:`STDInputError`.
    """
    name = path.name
    try:
        with Image.open(path) as im:
            source_size = im.size
            if im.width * im.height > MAX_DECODE_PIXELS:
                raise STDInputError(what, f"'{name}' is {im.width}x{im.height} ({im.width * im.height / 1e6:.0f} "
                                          f"megapixels), too large to decode; the limit is "
                                          f"{MAX_DECODE_PIXELS / 1e6:.0f} megapixels")
            if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # shown turned by 90 degrees:
                source_size = (im.height, im.width)  # the size the picture is seen at
            if min(source_size) < MIN_SOURCE_SIDE:
                raise STDInputError(what, f"'{name}' is {im.width}x{im.height}, too small to stylize: both sides "
                                          f"need at least {MIN_SOURCE_SIDE} pixels")
            if im.mode in ("RGB", "L", "CMYK", "YCbCr"):
                im.draft(im.mode, (max_side, max_side))  # JPEG: decode at a reduced scale when far too large
            image, notices = to_rgb(im, what)
    except STDInputError:
        raise
    except Image.DecompressionBombError as err:
        raise STDInputError(what, f"'{name}' is too large to decode safely ({scrub(str(err), path)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise STDInputError(what, f"'{name}' is not an image that can be read ({IMAGE_FORMATS}): "
                                  f"{scrub(str(err), path)}") from None
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notices.append(f"The {what} is {source_size[0]}x{source_size[1]}, above the {max_side}-pixel limit: it was "
                       f"downscaled to {image.width}x{image.height}.")
    return image, notices, source_size


def _ratio(w: int, h: int) -> str:
    r = max(w, h) / min(w, h)
    return f"{r:.3g}:1" if w >= h else f"1:{r:.3g}"


def size_notices(what: str, source: tuple[int, int], used: tuple[int, int], long_side: int) -> list[str]:
    """What the user must be told about running ``source`` (width, height) at ``used``: an upscale, or an aspect
    ratio that the output size cannot hold (the short side cannot go below one latent pixel)."""
    (sw, sh), (w, h) = source, used
    notices = []
    if max(w, h) > max(sw, sh) * 1.01:
        notices.append(f"The {what} is {sw}x{sh}, smaller than the output size {long_side}: it was upscaled "
                       f"{max(w, h) / max(sw, sh):.3g}x to {w}x{h}; a larger input gives a sharper result.")
    if abs(math.log((w / h) / (sw / sh))) > math.log(ASPECT_TOLERANCE):
        notices.append(f"The {what} is {sw}x{sh} ({_ratio(sw, sh)}); at output size {long_side} it runs at {w}x{h} "
                       f"({_ratio(w, h)}), so it is squashed: raise the output size or crop the {what}.")
    return notices


def fit_size(width: int, height: int, long_side: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) with the long side at ``long_side``, aspect ratio kept, both multiples of ``multiple``."""
    scale = long_side / max(width, height)

    def snap(v: int) -> int:
        return max(multiple, int(round(v * scale / multiple)) * multiple)

    return snap(width), snap(height)


def image_to_frames(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image resized to ``size`` (width, height) as a frame batch [1, H, W, 3] in 0..1 (resampled by the
    core's one policy, :mod:`comfyui_std.core.frames`)."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    frames = data.view(1, image.height, image.width, 3).float() / 255.0
    return resize_frames(frames, size)


def frame_to_image(frame: torch.Tensor) -> Image.Image:
    """One frame [H, W, 3] in 0..1 as a PIL image."""
    data = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(data)


def parameters_text(record: dict) -> str:
    """A1111-style "parameters" text (prompt, negative prompt, one line of settings) for image viewers."""
    s, plan = record["settings"], record["plan"]
    fields = {"Steps": plan["nfe"], "Sampler": f"STD ({plan['name']} plan)", "CFG scale": s["cfg"],
              "Seed": s["seed"], "Size": record["size"], "Model": record["base_model"],
              "Denoising strength": s["start_strength"], "STD start timestep": plan["start_timestep"],
              "STD timesteps": " ".join(str(t) for t in plan["timesteps"]), "STD gamma": s["gamma"],
              "Lora": record.get("lora") or "none", "Style": record.get("style") or "none"}
    line = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return f"{s['prompt']}\nNegative prompt: {s['negative_prompt']}\n{line}"


def plan_record(plan: STDPlan) -> dict:
    return {"name": plan.plan, "nfe": plan.nfe, "start_strength": plan.start_strength,
            "start_timestep": plan.start_timestep, "timesteps": list(plan.timesteps),
            "scheduler_steps": plan.scheduler_steps}


def run_record(settings, plan: STDPlan, size: tuple[int, int], *, base_model: str, lora, style_used: bool,
               app: str = "std_app", seconds: float | None = None, **extra) -> dict:
    """The settings record of a run: everything needed to reproduce it, written into PNGs (the ``std`` text chunk
    and, through :func:`parameters_text`, ``parameters``), video files (their ``comment`` tag) and JSON sidecars.

    Args:
        settings: the run's validated :class:`~std_app.settings.StyleSettings`.
        plan: the STD plan it ran; size: (width, height) of the output.
        base_model: the base model's name; lora: the :class:`~std_app.models.LoraEntry` it ran, or None.
        style_used: whether a style reference was given (recorded with its preset and weight).
        app: who wrote it (``std_app``, ``std_app.batch``); seconds: the run's wall time, when known.
        extra: further fields (``frames``, ``source``, ``fps``, the chunking, ...).
    """
    record = {"app": app, "settings": settings.as_dict(), "plan": plan_record(plan), "size": f"{size[0]}x{size[1]}",
              "base_model": base_model, "lora": lora.name if lora else None,
              "style": f"{settings.style_preset} x{settings.style_weight:g}" if style_used else None}
    if seconds is not None:
        record["seconds"] = round(seconds, 3)
    record.update(extra)
    return record


def save_png(image: Image.Image, path: Path, record: dict) -> Path:
    """Save ``image`` as PNG with ``parameters`` (A1111 text) and ``std`` (JSON of ``record``) text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(record))
    info.add_text("std", json.dumps(record, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path
