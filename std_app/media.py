"""Reading uploads, sizing frames and writing results (PNG with the settings in its metadata, mp4)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from comfyui_std.core import STDInputError, STDPlan

#: what PIL is allowed to decode at all (pixels); larger files are refused before decoding (decompression bombs)
MAX_DECODE_PIXELS = 100_000_000


def upload_path(payload, what: str) -> Path:
    """The file behind an upload: a Gradio ``FileData`` dict (``VideoData``: under "video"), or a plain path."""
    if isinstance(payload, dict) and isinstance(payload.get("video"), dict):
        payload = payload["video"]
    if isinstance(payload, dict):
        payload = payload.get("path")
    if not payload:
        raise STDInputError(what, "nothing was uploaded: add one first")
    path = Path(payload)
    if not path.is_file():
        raise STDInputError(what, f"the upload '{path.name}' is gone; upload it again")
    return path


def read_image(payload, what: str, max_side: int) -> tuple[Image.Image, list[str]]:
    """Open an uploaded image as RGB (EXIF orientation applied); returns it with notices for the user.

    Images whose long side exceeds ``max_side`` are downscaled to it (with a notice); files that are not images,
    or too large to decode safely, raise :class:`STDInputError`.
    """
    path = upload_path(payload, what)
    try:
        with Image.open(path) as im:
            source_size = im.size
            if im.width * im.height <= MAX_DECODE_PIXELS:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when far too large
                image = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as err:
        raise STDInputError(what, f"'{path.name}' is too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise STDInputError(what, f"'{path.name}' is not an image that can be read (PNG, JPEG, WebP, BMP, TIFF, "
                                  f"GIF): {err}") from None
    if source_size[0] * source_size[1] > MAX_DECODE_PIXELS:
        raise STDInputError(what, f"'{path.name}' is {source_size[0]}x{source_size[1]} "
                                  f"({source_size[0] * source_size[1] / 1e6:.0f} megapixels), too large to decode; "
                                  f"the limit is {MAX_DECODE_PIXELS / 1e6:.0f} megapixels")
    notices = []
    if max(source_size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notices.append(f"The {what} is {source_size[0]}x{source_size[1]}, above the {max_side}-pixel limit: it was "
                       f"downscaled to {image.width}x{image.height}.")
    return image, notices


def fit_size(width: int, height: int, long_side: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) with the long side at ``long_side``, aspect ratio kept, both multiples of ``multiple``."""
    scale = long_side / max(width, height)

    def snap(v: int) -> int:
        return max(multiple, int(round(v * scale / multiple)) * multiple)

    return snap(width), snap(height)


def image_to_frames(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image resized to ``size`` (width, height) as a frame batch [1, H, W, 3] in 0..1."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(1, image.height, image.width, 3).float() / 255.0


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Frames [N, H, W, 3] resized to ``size`` (width, height) with antialiased bilinear filtering."""
    if (frames.shape[2], frames.shape[1]) == size:
        return frames
    x = frames.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


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


def save_png(image: Image.Image, path: Path, record: dict) -> Path:
    """Save ``image`` as PNG with ``parameters`` (A1111 text) and ``std`` (JSON of ``record``) text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(record))
    info.add_text("std", json.dumps(record, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path
