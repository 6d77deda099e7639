"""Find model files as users have them, with messages a user can act on.

Files come as a path, a name inside a ComfyUI ``models`` folder (``--models-dir``), or a Hugging Face reference (a
base model id ``owner/name``; a single file as ``hf:owner/name/path/file.safetensors``), which downloads with a
progress bar. A missing file raises :class:`~comfyui_std.core.errors.STDInputError` naming the file and the folder to
put it in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from comfyui_std.core.errors import STDInputError

#: ComfyUI ``models/`` sub-folders searched for each kind of file
FOLDERS = {"base": ("checkpoints", "diffusers"), "lora": ("loras",), "ip_adapter": ("ipadapter",),
           "image_encoder": ("clip_vision",), "motion_module": ("animatediff_models",)}
#: what each kind is, for messages
WHAT = {
    "base": "base model (SDXL or SD1.5: a diffusers folder or a single .safetensors checkpoint, e.g. "
            "sd_xl_base_1.0.safetensors)",
    "lora": "STD LoRA (e.g. std_sdxl_i2i_eta0.75.safetensors from SecondComming/Single-Trajectory-Distillation)",
    "ip_adapter": "IP-Adapter (e.g. ip-adapter_sdxl_vit-h.safetensors from h94/IP-Adapter, sdxl_models/)",
    "image_encoder": "CLIP image encoder of the IP-Adapter (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, "
                     "h94/IP-Adapter models/image_encoder/model.safetensors)",
    "motion_module": "motion module (AnimateDiff v2/v3 or AnimateDiff-SDXL .ckpt/.safetensors, Hotshot-XL "
                     "hsxl_temporal_layers.safetensors, or a diffusers MotionAdapter folder), as AnimateDiff-Evolved "
                     "keeps them",
}
LABEL = {"base": "base model", "lora": "lora", "ip_adapter": "IP-Adapter", "image_encoder": "image encoder",
         "motion_module": "motion module"}
FLAG = {"base": "--base", "lora": "--lora", "ip_adapter": "--ip-adapter", "image_encoder": "--image-encoder",
        "motion_module": "--motion-module"}
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """Where one model comes from: a local path, or a Hub repository (and file inside it)."""

    kind: str
    path: Path | None = None
    repo_id: str | None = None
    filename: str | None = None

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path.name
        return f"{self.repo_id}/{self.filename}" if self.filename else str(self.repo_id)


def not_found(kind: str, value: str, models_dir: Path | None) -> STDInputError:
    """The message for a model file that is not there: what it is, where it was looked for, where to put it."""
    folders = [models_dir / f for f in FOLDERS[kind]] if models_dir else []
    looked = f" Looked in: {', '.join(str(f) for f in folders)}." if folders else ""
    put = (f"Put it into {folders[0]}" if folders else "Pass the full path") + f", or pass {FLAG[kind]} /full/path"
    return STDInputError(LABEL[kind], f"'{value}' was not found: it should be the {WHAT[kind]}.{looked} {put}.")


def resolve(kind: str, value: str, models_dir: Path | None = None) -> ModelRef:
    """Turn a user's ``value`` (path, name in the models folder, or Hub reference) into a :class:`ModelRef`."""
    value = str(value).strip().strip('"')
    if not value:
        raise not_found(kind, value, models_dir)
    if value.startswith("hf:"):
        parts = value[3:].split("/")
        if len(parts) == 2 and kind == "base":
            return ModelRef(kind, repo_id="/".join(parts))
        if len(parts) < 3:
            raise STDInputError(LABEL[kind], f"'{value}': a Hub file is hf:owner/name/path/to/file")
        return ModelRef(kind, repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
    path = Path(value).expanduser()
    if path.exists():
        return ModelRef(kind, path=path.resolve())
    if models_dir is not None and not path.is_absolute():
        for folder in FOLDERS[kind]:
            for candidate in (models_dir / folder / value, *((models_dir / folder / (value + s)) for s in
                                                             WEIGHT_SUFFIXES)):
                if candidate.exists():
                    return ModelRef(kind, path=candidate.resolve())
    if kind == "base" and _HUB_ID.match(value) and not value.endswith(WEIGHT_SUFFIXES):
        return ModelRef(kind, repo_id=value)
    raise not_found(kind, value, models_dir)


def local_file(ref: ModelRef) -> Path:
    """The file of a reference, downloading a Hub file (with huggingface_hub's progress bar) when needed."""
    if ref.path is not None:
        return ref.path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, ref.filename))
    except Exception as err:  # offline, missing repo or file: many exception types
        raise STDInputError(LABEL[ref.kind], f"could not download {ref.label} from the Hugging Face Hub "
                                             f"({type(err).__name__}: {err})") from None


def hub_snapshot(repo_id: str, patterns: list[str] | None = None, label: str = "base model") -> Path:
    """A diffusers repository from the Hub (configs, tokenizers and safetensors weights only; progress bars)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns or ["*.json", "*.txt", "*.safetensors"]))
    except Exception as err:  # offline, missing repo: many exception types
        raise STDInputError(label, f"could not download {repo_id} from the Hugging Face Hub (a Hub id needs network "
                                   f"access the first time; {type(err).__name__}: {first_line(err)})") from None


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def safetensors_metadata(path: Path, label: str) -> dict[str, str]:
    """The string metadata of a .safetensors header (without reading tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # corrupt header: safetensors raises several types
        raise STDInputError(label, f"'{path.name}' is not a readable .safetensors file ({err})") from None


def read_safetensors(path: Path, label: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a missing, corrupt or non-safetensors file is a clear error."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise STDInputError(label, f"'{path}' does not exist")
    if path.suffix != ".safetensors":
        raise STDInputError(label, f"'{path.name}': only .safetensors files are read (pickled .ckpt/.pt/.bin files "
                                   "can run code when loaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # corrupt file: safetensors raises several types
        raise STDInputError(label, f"'{path.name}' is not a readable .safetensors file ({err})") from None
