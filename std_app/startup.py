"""From command-line options to a loaded :class:`~std_app.engine.STDEngine` (real files or the tiny zoo)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_std.core import STDInputError
from std_hf.devices import DTYPES, pick_device
from std_hf.memory import device_budget
from std_hf.files import FOLDERS, local_file, resolve

from . import tiny
from .engine import STDEngine
from .models import LoraCatalog, architecture, attach_ip_adapter, load_pipeline

log = logging.getLogger("std_app")

#: IP-Adapter + image encoder files looked for in the models folder when none are named
STYLE_FILES = {
    "sdxl": (("ip-adapter_sdxl_vit-h.safetensors",), ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",)),
    "sd15": (("ip-adapter_sd15.safetensors",), ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",)),
}


@dataclass
class ModelOptions:
    """Where the models come from (see ``python gradio_app.py --help``)."""

    base: str | None = None
    base_config: str | None = None
    tokenizer: str | None = None  # CLIP tokenizer files for a single-file base (default: found in ComfyUI)
    loras: list[str] = field(default_factory=list)
    ip_adapter: str | None = None
    image_encoder: str | None = None
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    tiny: str | None = None  # "sd15" or "sdxl": build and use the tiny offline zoo
    offload: str = "auto"    # none | model | sequential | auto (from the memory plan, std_hf.memory)
    vram_budget: float | None = None  # GiB to plan for instead of the GPU's free memory
    motion_module: str | None = None  # a motion module for videos (models/animatediff_models, a path, or "tiny")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on a CUDA GPU, else fp32."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def tiny_options(arch: str, root: Path | None = None) -> ModelOptions:
    """Options for the tiny offline zoo, built under ``root`` (a temporary folder by default)."""
    root = tiny.build_tiny_models(Path(root or tempfile.mkdtemp(prefix="std-tiny-")), arch)
    return ModelOptions(base=tiny.base_name(arch), models_dir=root, device="cpu", dtype="fp32",
                        ip_adapter=tiny.TINY_FILES["ip_adapter"], image_encoder=tiny.TINY_FILES["image_encoder"])


def no_base_error(models_dir: Path | None) -> STDInputError:
    """The startup message when no base model was named (listing the checkpoints the models folder holds)."""
    folders = [models_dir / f for f in FOLDERS["base"]] if models_dir else []
    found = sorted(p.name for f in folders if f.is_dir() for p in f.iterdir()
                   if p.suffix == ".safetensors" or (p / "model_index.json").exists())
    where = f" Found in {', '.join(str(f) for f in folders)}: {', '.join(found)}." if found else ""
    return STDInputError("base model", "no base model given: pass --base with an SDXL or SD1.5 checkpoint (a path, a "
                                       "file name in --models-dir/checkpoints, or a Hugging Face id such as "
                                       f"stabilityai/stable-diffusion-xl-base-1.0).{where}")


def _style_files(options: ModelOptions, arch: str) -> tuple[Path, Path] | None:
    """The IP-Adapter and image encoder to attach, or None when none are configured or found."""
    adapter, encoder = options.ip_adapter, options.image_encoder
    if adapter is None and encoder is None:
        if options.models_dir is None:
            return None
        adapters, encoders = STYLE_FILES[arch]
        adapter = next((a for a in adapters if (options.models_dir / "ipadapter" / a).exists()), None)
        encoder = next((e for e in encoders if (options.models_dir / "clip_vision" / e).exists()), None)
        if adapter is None or encoder is None:
            return None
    if adapter is None or encoder is None:
        missing = "--ip-adapter" if adapter is None else "--image-encoder"
        raise STDInputError(missing.strip("-").replace("-", " "), f"a style reference needs both --ip-adapter and "
                                                                  f"--image-encoder; {missing} is missing")
    return (local_file(resolve("ip_adapter", adapter, options.models_dir)),
            local_file(resolve("image_encoder", encoder, options.models_dir)))


def load_engine(options: ModelOptions) -> STDEngine:
    """Resolve and load everything; raises :class:`STDInputError` with a user-facing message when a file is
    missing or does not fit."""
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    if not options.base:
        raise no_base_error(options.models_dir)
    ref = resolve("base", options.base, options.models_dir)
    pipe = load_pipeline(ref, dtype, options.base_config, options.models_dir, options.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    arch = architecture(pipe)
    motion = None
    if options.motion_module:
        from comfyui_std.core.motion_format import check_base
        from std_hf.motion import load_motion_adapter, motion_unet

        motion = load_motion_adapter(options.motion_module, options.models_dir, like_unet=pipe.unet)
        if options.motion_module != "tiny":
            check_base(motion.info, arch, motion.name, ref.label)
        pipe.unet = motion_unet(pipe.unet, motion)
        logging.getLogger("std_app.motion").info(
                 "motion module %s: %s; videos run in clips of up to %d frames (default %d)", motion.name,
                 motion.line(), motion.info.max_frames, motion.info.default_context)
    catalog = LoraCatalog.discover(options.loras, options.models_dir)
    if not catalog.entries:
        log.warning("no STD LoRA found: put std_sdxl_i2i_eta0.75.safetensors (and the others of the model zoo) in "
                    "%s, or pass --lora; the app runs the base model only", (options.models_dir or Path("models")) /
                    "loras")
    style = None
    files = _style_files(options, arch)
    if files is None:
        adapters, encoders = STYLE_FILES[arch]
        log.warning("style reference off: put %s in models/ipadapter and %s in models/clip_vision (with "
                    "--models-dir), or pass --ip-adapter and --image-encoder", adapters[0], encoders[0])
    else:
        style = attach_ip_adapter(pipe, files[0], files[1], ref.label)
    budget = None if options.vram_budget is None else device_budget(device, options.vram_budget)
    folder = motion.path.parent if motion is not None and motion.path is not None and motion.path.is_file() else None
    engine = STDEngine(pipe, catalog, ref.label, style, device=device, offload=options.offload, vram_budget=budget,
                       motion=motion, motion_folder=folder)
    logging.getLogger("std_app.memory").info("%s; %s", device_line(device), engine.start_plan.describe())
    return engine


def device_line(device: torch.device) -> str:
    """The device the app runs on, with its memory; a CPU build of torch on a machine with an NVIDIA GPU is
    stated (it would run SDXL on the CPU without a word otherwise)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"device {device} ({props.name}, {props.total_memory / 2 ** 30:.1f} GiB)"
    text = f"device {device}"
    if torch.version.cuda is None and (shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists()):
        text += (" - this machine has an NVIDIA GPU but this torch is a CPU build (torch.version.cuda is None): "
                 "install the CUDA build of torch to use the GPU")
    return text
