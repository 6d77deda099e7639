"""SD1.5 / SDXL base models as users have them, loaded strictly, counted and offline.

:func:`load_base` takes

* ``tiny``: tiny random SD1.5-shaped models built in-process (:mod:`std_hf.tiny`), for CPU smoke runs;
* a single-file ``.safetensors`` checkpoint in the LDM layout ComfyUI, A1111 and Civitai use (fp16, bf16 or fp32):
  the architecture, the prediction type and every component's config are read from the tensors
  (:mod:`std_hf.ldm`), so nothing is fetched; the CLIP tokenizer files come from ``tokenizer=`` (a folder with
  ``vocab.json`` + ``merges.txt``), else from a ComfyUI install (``comfy/sd1_tokenizer``: found above the
  checkpoint or the models folder, or through ``COMFYUI_PATH``), else from an existing Hugging Face cache entry of
  ``openai/clip-vit-large-patch14`` (read locally, never downloaded);
* a diffusers folder (``model_index.json``), or a Hub id of one (downloaded once with progress bars).

Every component is loaded strictly: a tensor the model needs that the file lacks, a tensor of the component the
model has no place for, or a shape that differs stops the load with a message naming the component and the key.
Tensors a file may legitimately carry but no model holds (CLIP ``position_ids``, OpenCLIP's ``logit_scale``,
schedule buffers, EMA copies) are counted in the report, never dropped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.schedules import DiscreteSchedule

from . import ldm
from .files import ModelRef, hub_snapshot, resolve
from .weights import ComponentReport, TensorSource, build_on_meta, check, folder_weights, materialize

ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
CLIP_REPO = "openai/clip-vit-large-patch14"
#: the training schedule of SD1.5 and SDXL (single files carry none)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "prediction_type": "epsilon"}
#: file tensors outside the components that some checkpoints carry (original LDM schedule buffers, EMA weights)
NON_MODEL = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus_",
             "posterior_", "lvlb_weights", "model.diffusion_model.__", "logvar", "v_pred", "ztsnr")


@dataclass
class Base:
    """The pieces of a text-to-image model the trainers and the app need.

    Latents are ``(vae_output + latent_shift) * latent_scale``: SD's KL VAE has shift 0 and scale 0.18215 (SD1.5) or
    0.13025 (SDXL); a ComfyUI TAESD stored in a checkpoint carries its own scale and shift.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    arch: str                                   # "sd15" or "sdxl"
    schedule: DiscreteSchedule
    name: str
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    reports: list[ComponentReport] = field(default_factory=list)
    source: str = ""
    scheduler_config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def cond_dim(self) -> int:
        """Width of the pooled text embedding (what the discriminator is conditioned on)."""
        enc = self.text_encoders[-1]
        return int(getattr(enc.config, "projection_dim", None) or enc.config.hidden_size) if self.arch == "sdxl" \
            else int(enc.config.hidden_size)

    @property
    def codec(self) -> "LatentCodec":
        return LatentCodec(self.vae, self.latent_scale, self.latent_shift)

    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents (a posterior sample with ``generator``, else the mean)."""
        return self.codec.encode(pixels, generator)

    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) of the latent posterior, already shifted and scaled (std is None for a deterministic VAE)."""
        return self.codec.moments(pixels)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def to(self, device, dtype=None, vae_dtype=None):
        """Move (and cast) the frozen weights: UNet and text encoders to ``dtype``, the VAE to ``vae_dtype``."""
        for module, dt in [(self.unet, dtype), (self.vae, vae_dtype or dtype), *((t, dtype) for t in
                                                                             self.text_encoders)]:
            if dt is not None:
                cast_floats(module, dt)
            module.to(device)
        return self

    def describe(self) -> list[str]:
        """The lines ``python -m training.check_base`` prints."""
        lines = [f"architecture: {ARCH_NAMES.get(self.arch, self.arch)}", f"prediction type: {self.prediction_type}"]
        lines += [r.line() for r in self.reports]
        return lines


@dataclass
class LatentCodec:
    """Pixels <-> latents through a VAE, for the trainers and the app: ``latents = (vae_output + shift) * scale``.

    ``batch`` processes that many images at a time (the app's video path: memory follows the batch, and a streamed
    run and an in-memory run of the same frames give the same latents bit for bit because both go through here with
    the same blocks); each block goes to the VAE's device and dtype, and comes back float32 (on ``device`` when
    given, else on the VAE's device).
    """

    vae: torch.nn.Module
    scale: float
    shift: float = 0.0
    device: torch.device | str | None = None  # where the VAE computes, when its weights live elsewhere (offload)

    def _blocks(self, x: torch.Tensor, batch: int | None, prepare=None):
        """Blocks of ``batch`` rows of ``x`` (all at once without), each ``prepare``d in float32, then on the VAE's
        device (``device`` when set) and dtype."""
        step = batch or max(1, x.shape[0])
        param = next(self.vae.parameters())
        device = self.device if self.device is not None else param.device
        for s in range(0, x.shape[0], step):
            block = x[s:s + step]
            yield (block if prepare is None else prepare(block.float())).to(device, param.dtype)

    def _own_precision(self):
        """The VAE computes in its own dtype: any autocast of the caller (a trainer's bf16/fp16 forward) is off
        inside, so an fp32 SDXL VAE never runs in fp16."""
        device = torch.device(self.device) if self.device is not None else next(self.vae.parameters()).device
        return torch.autocast("cpu" if device.type == "meta" else device.type, enabled=False)

    def _finite(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.device.type != "meta" and not bool(torch.isfinite(x).all()):  # meta: shapes only, nothing to check
            dtype = str(next(self.vae.parameters()).dtype).replace("torch.", "")
            raise STDInputError("vae", f"the VAE gave non-finite {what} (NaN or inf) in {dtype}: run it in fp32 "
                                       "(SD and SDXL VAEs overflow in fp16), or check the input for NaN")
        return x

    def moments(self, pixels: torch.Tensor, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) of the latent posterior of pixels ``[N, 3, H, W]`` in [-1, 1], shifted and scaled (std is
        None for a deterministic VAE such as TAESD)."""
        means, stds = [], []
        with self._own_precision():
            for x in self._blocks(pixels, batch):
                out = self.vae.encode(x)
                dist = getattr(out, "latent_dist", None)
                if dist is None:  # AutoencoderTiny (TAESD): deterministic
                    means.append(self._finite((out.latents.float() + self.shift) * self.scale, "latents"))
                else:
                    means.append(self._finite((dist.mean.float() + self.shift) * self.scale, "latents"))
                    stds.append(dist.std.float() * self.scale)
        return torch.cat(means), (torch.cat(stds) if stds else None)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
               batch: int | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents: a posterior sample with ``generator``, else the mean."""
        mean, std = self.moments(pixels, batch)
        if generator is None or std is None:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator).to(mean)

    def decode(self, latents: torch.Tensor, batch: int | None = None, device=None) -> torch.Tensor:
        """Latents -> pixels ``[N, 3, H, W]`` in about [-1, 1], float32."""
        out = []
        with self._own_precision():
            for z in self._blocks(latents, batch, lambda z: z / self.scale - self.shift):
                x = self._finite(self.vae.decode(z).sample.float(), "pixels")
                out.append(x if device is None else x.to(device))
        return torch.cat(out)


def cast_floats(module: torch.nn.Module, dtype: torch.dtype, skip: str | None = None) -> None:
    """Cast a module's floating-point parameters and buffers in place (``skip``: names containing it stay)."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and (skip is None or skip not in name):
            t.data = t.data.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# CLIP tokenizer files

def _has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def tokenizer_candidates(near: list[Path]) -> list[Path]:
    """Folders that may hold the CLIP BPE files, in the order they are tried (see the module docstring)."""
    out = []
    env = os.environ.get("COMFYUI_PATH")
    roots = [Path(env)] if env else []
    for p in near:
        p = Path(p).expanduser().resolve()
        roots += [p, *p.parents]
    for root in roots:
        cand = root / "comfy" / "sd1_tokenizer"
        if cand not in out:
            out.append(cand)
    return out


def find_tokenizer(explicit: str | None, near: list[Path]) -> Path:
    """The folder of CLIP tokenizer files for a single-file checkpoint (never downloaded)."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not _has_tokenizer(folder):
            raise STDInputError("tokenizer", f"{folder} has no vocab.json and merges.txt (a CLIP tokenizer folder, "
                                             "e.g. ComfyUI/comfy/sd1_tokenizer)")
        return folder
    for cand in tokenizer_candidates(near):
        if _has_tokenizer(cand):
            return cand
    try:
        from huggingface_hub import try_to_load_from_cache

        vocab = try_to_load_from_cache(CLIP_REPO, "vocab.json")
        merges = try_to_load_from_cache(CLIP_REPO, "merges.txt")
        if isinstance(vocab, str) and isinstance(merges, str) and Path(vocab).parent == Path(merges).parent:
            return Path(vocab).parent
    except Exception:  # an unusable cache is the same as no cache
        pass
    raise STDInputError("tokenizer", "the CLIP tokenizer files (vocab.json, merges.txt) of this single-file "
                                     "checkpoint were not found: pass --tokenizer with a folder holding them "
                                     "(ComfyUI ships them in ComfyUI/comfy/sd1_tokenizer), or set COMFYUI_PATH to "
                                     "your ComfyUI folder")


def clip_tokenizers(folder: Path, arch: str, vocab_sizes: list[int]):
    """CLIP tokenizers for the text encoders (SDXL's second pads with "!", as it was trained)."""
    import warnings

    from transformers import CLIPTokenizer

    toks = []
    for i, rows in enumerate(vocab_sizes):
        kw = {"pad_token": "!"} if (arch == "sdxl" and i == 1) else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **kw)
        if len(tok) > rows:
            raise STDInputError("tokenizer", f"{folder} has {len(tok)} tokens but text encoder {i + 1} has only "
                                             f"{rows} embeddings: it is not the tokenizer of this checkpoint")
        toks.append(tok)
    return toks


# --------------------------------------------------------------------------------------------------------------------
# Single files

def detect(source: TensorSource, name: str) -> tuple[str, str]:
    """(architecture, prediction type) of a single-file checkpoint, or a clear refusal."""
    keys = source.keys()

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if not has(ldm.UNET):
        raise STDInputError("base model", f"'{name}' is not an SD1.5 or SDXL checkpoint (no model.diffusion_model.* "
                                          "tensors): it may be a LoRA, a VAE or a UNet-only file")
    if has("conditioner.embedders.0.model."):
        raise STDInputError("base model", f"'{name}' is an SDXL refiner; STD runs on SD1.5 and SDXL base models")
    if has("cond_stage_model.model."):
        raise STDInputError("base model", f"'{name}' is an SD2.x checkpoint (OpenCLIP-H text encoder); STD runs on "
                                          "SD1.5 and SDXL base models")
    if any(k.startswith("edm_") or k.startswith("edm_vpred.") for k in keys):
        raise STDInputError("base model", f"'{name}' is an EDM-parameterised model (e.g. Playground v2.5); STD needs "
                                          "a DDPM (epsilon or v) model")
    if "ztsnr" in keys:
        raise STDInputError("base model", f"'{name}' uses a zero-terminal-SNR schedule, which the STD plan does not "
                                          "support")
    if has(ldm.SDXL_TEXT_2) and has(ldm.SDXL_TEXT):
        arch = "sdxl"
    elif has(ldm.SD15_TEXT):
        arch = "sd15"
    else:
        raise STDInputError("base model", f"'{name}' has a UNet but no text encoder this project knows "
                                          "(cond_stage_model.transformer.* for SD1.5, conditioner.embedders.0/1 for "
                                          "SDXL)")
    c_in = source.shape(ldm.UNET + "input_blocks.0.0.weight")[1] if ldm.UNET + "input_blocks.0.0.weight" in source \
        else 4
    if c_in != 4:
        raise STDInputError("base model", f"'{name}' has a UNet with {c_in} input channels (an inpainting or "
                                          "instruct model); STD needs a 4-channel text-to-image base")
    return arch, "v_prediction" if "v_pred" in keys else "epsilon"


def _components(source: TensorSource, arch: str) -> dict[str, set[str]]:
    keys = source.keys()
    prefixes = {"unet": [ldm.UNET], "vae": [ldm.VAE]}
    if arch == "sdxl":
        prefixes.update(text_encoder=[ldm.SDXL_TEXT], text_encoder_2=[ldm.SDXL_TEXT_2])
    else:
        prefixes["text_encoder"] = [ldm.SD15_TEXT]
    return {name: {k for k in keys if any(k.startswith(p) for p in pre)} for name, pre in prefixes.items()}


def text_key_map(model_keys, file_keys, prefix: str = "") -> dict[str, tuple[str, None]]:
    """CLIP text towers are stored with or without the ``text_model.`` level (transformers 5 builds
    ``CLIPTextModel`` without it, files and ``CLIPTextModelWithProjection`` have it, old SD1.x files do not):
    pair each module key with the file key of the same tensor, whichever form the file uses."""
    files = set(file_keys)
    nested = any(k.startswith(prefix + "text_model.") for k in files)
    out = {}
    for k in model_keys:
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        if k.startswith("text_projection."):
            out[k] = (prefix + k, None)
        else:
            out[k] = (prefix + ("text_model." if nested else "") + bare, None)
    return out


def _text_encoder(source: TensorSource, prefix: str, token_ids: dict, config: dict | None = None):
    """CLIP-L on the meta device with its file-name map."""
    from transformers import CLIPTextConfig, CLIPTextModel

    shapes = source.meta_tensors(prefix)
    if not any(k.startswith(prefix + "text_model.") for k in shapes):
        shapes = {prefix + "text_model." + k[len(prefix):]: v for k, v in shapes.items()}
    cfg = CLIPTextConfig(**{**(config or ldm.clip_config(shapes, prefix)), **token_ids})
    model = build_on_meta(lambda: CLIPTextModel(cfg))
    return model, text_key_map(model.state_dict(), source.keys(), prefix)


def _vocab_rows(source: TensorSource, prefix: str) -> int:
    for key in (prefix + "text_model.embeddings.token_embedding.weight", prefix + "embeddings.token_embedding.weight",
                prefix + "token_embedding.weight"):
        if key in source:
            return source.shape(key)[0]
    return 0


def _token_ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _folder_config(folder: Path | None, sub: str) -> dict | None:
    if folder is None:
        return None
    path = folder / sub / "config.json"
    if not path.is_file():
        raise STDInputError("base config", f"{folder} has no {sub}/config.json")
    return {k: v for k, v in _json(path, "base config").items() if not k.startswith("_")}


def load_single_file(path: Path, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
                     near: list[Path] | None = None, check_only: bool = False,
                     config_folder: Path | None = None, vae_dtype: torch.dtype | None = None) -> Base:
    """Load an SD1.5/SDXL single-file checkpoint offline (see the module docstring).

    ``check_only`` reads only the header: the returned Base has meta-device modules and complete reports (what
    ``python -m training.check_base`` prints), and problems are reported instead of raised. ``config_folder``: a
    diffusers folder of the same architecture whose component configs and tokenizers are used instead of the ones
    read from the file (for files whose head counts or norms differ from the architecture's).
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    if path.suffix != ".safetensors":
        raise STDInputError("base model", f"'{path.name}': single-file checkpoints must be .safetensors (pickled "
                                          ".ckpt files can run code when loaded)")
    source = TensorSource([path])
    arch, prediction = detect(source, path.name)
    comps = _components(source, arch)
    text_prefixes = [ldm.SDXL_TEXT, ldm.SDXL_TEXT_2] if arch == "sdxl" else [ldm.SD15_TEXT]
    names = ["text_encoder", "text_encoder_2"][:len(text_prefixes)]
    reports, modules = [], {}
    try:
        if config_folder is not None:
            tok_folder = Path(config_folder) / "tokenizer"
            tokenizers = [CLIPTokenizer.from_pretrained(str(Path(config_folder) / t)) for t in
                          ("tokenizer", "tokenizer_2")[:len(text_prefixes)]]
        else:
            tok_folder = find_tokenizer(tokenizer, [path.parent, *(near or [])])
            tokenizers = clip_tokenizers(tok_folder, arch, [_vocab_rows(source, p) for p in text_prefixes])
    except (STDInputError, OSError) as err:
        if not check_only:
            if isinstance(err, STDInputError):
                raise
            raise STDInputError("tokenizer", f"{config_folder}: {err}") from None
        tok_folder, tokenizers = None, []
        reports.append(ComponentReport("tokenizer", needed=1, missing=[str(err)]))
    ids = [_token_ids(t) for t in tokenizers] or [{}, {}]

    def add(name, module, mapping, ignorable=ldm.IGNORED):
        report = check(module, mapping, source, name, comps[name], ignorable)
        reports.append(report)
        modules[name] = (module, mapping, report)

    # text encoders first: SDXL's UNet config needs the pooled width
    try:
        text_cfg = _folder_config(config_folder, "text_encoder")
        model, mapping = _text_encoder(source, text_prefixes[0], ids[0], text_cfg)
        add("text_encoder", model, mapping)
        if arch == "sdxl":
            cfg2 = _folder_config(config_folder, "text_encoder_2") or ldm.open_clip_config(
                source.meta_tensors(ldm.SDXL_TEXT_2))
            cfg = CLIPTextConfig(**{**cfg2, **ids[-1]})
            model = build_on_meta(lambda: CLIPTextModelWithProjection(cfg))
            mapping = {k: (name, (lambda t, k=k, part=part: ldm.open_clip_tensor(k, t, part)))
                       for k, (name, part) in ldm.open_clip_key_map(model.state_dict()).items()}
            add("text_encoder_2", model, mapping)
        pooled = modules["text_encoder_2"][0].config.projection_dim if arch == "sdxl" else None
        ucfg = _folder_config(config_folder, "unet") or ldm.unet_config(source.meta_tensors(ldm.UNET), arch, pooled)
        unet = build_on_meta(lambda: UNet2DConditionModel(**ucfg))
        add("unet", unet, {k: (ldm.UNET + v, None) for k, v in
                           ldm.unet_key_map(dict(unet.config), unet.state_dict()).items()})
        if any(k.startswith(ldm.VAE + ldm.TAESD_ENCODER) for k in comps["vae"]):
            vae = build_on_meta(lambda: AutoencoderTiny())
            add("vae", vae, {k: (ldm.VAE + v, None) for k, v in ldm.taesd_key_map(vae.state_dict()).items()},
                {**ldm.IGNORED, "vae_scale": "TAESD latent scale (applied to the latents)",
                 "vae_shift": "TAESD latent shift (applied to the latents)"})
        elif comps["vae"]:
            vcfg = _folder_config(config_folder, "vae") or ldm.vae_config(source.meta_tensors(ldm.VAE), arch)
            vae = build_on_meta(lambda: AutoencoderKL(**vcfg))
            like = vae.state_dict()
            add("vae", vae, {k: (ldm.VAE + v, (lambda t, k=k: ldm.vae_tensor(k, t, like[k])))
                             for k, v in ldm.vae_key_map(dict(vae.config), like).items()})
        else:
            raise STDInputError("base model", f"'{path.name}' holds no VAE (first_stage_model.*); use a checkpoint "
                                              "with its VAE")
    except ldm.LayoutError as err:
        raise STDInputError("base model", f"'{path.name}': {err}") from None
    other = sorted(set(source.keys()) - set().union(*comps.values()))
    if other:
        reports.append(ComponentReport("other", ignored={
            k: ("schedule buffers, EMA copies or flags" if k.startswith(NON_MODEL) else
                "outside the unet, text encoders and vae") for k in other}))
    sched_cfg = SD_SCHEDULER | {"prediction_type": prediction}
    scale, shift = float(modules["vae"][0].config.scaling_factor), 0.0
    if isinstance(modules["vae"][0], AutoencoderTiny):  # ComfyUI's TAESD: latents = (enc / s + b) * SD's scale
        s = source.tensor(ldm.VAE + "vae_scale").float().item() if ldm.VAE + "vae_scale" in source else 1.0
        b = source.tensor(ldm.VAE + "vae_shift").float().item() if ldm.VAE + "vae_shift" in source else 0.0
        scale, shift = (0.13025 if arch == "sdxl" else 0.18215) / s, b * s
    if not check_only:
        for name in modules:
            module, mapping, report = modules[name]
            materialize(module, mapping, source, (vae_dtype or dtype) if name == "vae" else dtype, report)
    return Base(modules["unet"][0], modules["vae"][0], [modules[n][0] for n in names], tokenizers, arch,
                DiscreteSchedule.from_config(sched_cfg), path.stem, scale, shift, reports, str(path), sched_cfg,
                {"tokenizer": str(tok_folder)})


# --------------------------------------------------------------------------------------------------------------------
# diffusers folders

def _json(path: Path, label: str = "base model") -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise STDInputError(label, f"{path} is not a readable JSON file ({err})") from None


def _folder_component(folder: Path, sub: str, factory, reports, dtype, check_only):
    comp = folder / sub
    if not (comp / "config.json").is_file():
        raise STDInputError("base model", f"{folder.name}: {sub}/config.json is missing")
    source = TensorSource(folder_weights(comp, "base model"))
    module = build_on_meta(lambda: factory(comp))
    mapping = (text_key_map(module.state_dict(), source.keys()) if sub.startswith("text_encoder") else
               {k: (k, None) for k in module.state_dict()})
    report = check(module, mapping, source, sub, set(source.keys()), ldm.IGNORED)
    report.name = sub
    reports.append(report)
    if not check_only:
        materialize(module, mapping, source, dtype, report)
    return module


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32, check_only: bool = False,
                          vae_dtype: torch.dtype | None = None) -> Base:
    """A diffusers SD1.5/SDXL folder, every component loaded strictly from its own safetensors files."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    info = _json(folder / "model_index.json")
    sdxl = info.get("text_encoder_2") not in (None, [None, None])
    cls = str(info.get("_class_name", ""))
    if cls and "StableDiffusion" not in cls:
        raise STDInputError("base model", f"'{folder.name}' is a {cls}; STD runs on SD1.5 and SDXL "
                                          "(StableDiffusionPipeline / StableDiffusionXLPipeline) models")
    reports: list[ComponentReport] = []
    unet = _folder_component(folder, "unet", lambda p: UNet2DConditionModel.from_config(_json(p / "config.json")),
                             reports, dtype, check_only)

    def vae_factory(p):
        cfg = _json(p / "config.json")
        return (AutoencoderTiny if cfg.get("_class_name") == "AutoencoderTiny" else AutoencoderKL).from_config(cfg)

    vae = _folder_component(folder, "vae", vae_factory, reports, vae_dtype or dtype, check_only)
    encs = [_folder_component(folder, "text_encoder", lambda p: CLIPTextModel(CLIPTextConfig.from_pretrained(str(p))),
                              reports, dtype, check_only)]
    toks = [CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))]
    if sdxl:
        encs.append(_folder_component(folder, "text_encoder_2", lambda p: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(str(p))), reports, dtype, check_only))
        toks.append(CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")))
    sched = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = {k: v for k, v in (_json(sched) if sched.exists() else SD_SCHEDULER).items() if not
                 k.startswith("_")}
    try:
        schedule = DiscreteSchedule.from_config(sched_cfg)
    except STDInputError as err:
        raise STDInputError("base model", f"'{folder.name}': {err}") from None
    return Base(unet, vae, encs, toks, "sdxl" if sdxl else "sd15", schedule, folder.name,
                float(getattr(vae.config, "scaling_factor", 1.0)), 0.0, reports, str(folder), SD_SCHEDULER | {
                    k: sched_cfg[k] for k in SD_SCHEDULER if k in sched_cfg})


# --------------------------------------------------------------------------------------------------------------------
# Entry point

def load_base(spec, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
              models_dir: Path | None = None, seed: int = 0, check_only: bool = False, config: str | None = None,
              vae_dtype: torch.dtype | None = None) -> Base:
    """Load the base model named by ``spec`` (a value as users give it, or a resolved :class:`ModelRef`; see the
    module docstring), UNet and text encoders in ``dtype``, the VAE in ``vae_dtype`` (default ``dtype``); clear
    errors for missing or foreign files.

    For a single file, ``tokenizer`` names a folder of CLIP tokenizer files, or ``config`` a diffusers folder or Hub
    id of the same architecture whose component configs and tokenizers are used (files whose norms or heads the
    shapes cannot tell; from the Hub only its JSON and text files are fetched).
    """
    ref = spec if isinstance(spec, ModelRef) else None if spec == "tiny" else resolve("base", spec, models_dir)
    single = ref is not None and ref.path is not None and not ref.path.is_dir()
    for name, value in (("tokenizer", tokenizer), ("base config", config)):
        if value and not single:
            raise STDInputError(name, f"only used with a single-file base; '{spec if ref is None else ref.label}' "
                                      "brings its own configs and tokenizer")
    if tokenizer and config:
        raise STDInputError("tokenizer", "the base config folder brings its own tokenizers: give a tokenizer folder "
                                         "or a base config, not both")
    vae_dtype = vae_dtype or dtype
    if ref is None:
        return tiny_base("sd15", seed)
    if ref.path is None:
        return load_diffusers_folder(hub_snapshot(ref.repo_id), dtype, check_only, vae_dtype)
    path = ref.path
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise STDInputError("base model", f"{path} is a folder but not a diffusers model (no model_index.json)")
        return load_diffusers_folder(path, dtype, check_only, vae_dtype)
    folder = None
    if config:
        cref = resolve("base", config, models_dir)
        folder = cref.path if cref.path is not None else hub_snapshot(cref.repo_id, ["*.json", "*.txt"],
                                                                      "base config")
    near = [models_dir] if models_dir else []
    return load_single_file(path, dtype, tokenizer, near, check_only, folder, vae_dtype)


# --------------------------------------------------------------------------------------------------------------------
# Text conditioning

@torch.no_grad()
def tiny_base(arch: str = "sd15", seed: int = 0, shape=None) -> Base:
    """The trainers' ``tiny`` base: :func:`std_hf.tiny.tiny_components` as a :class:`Base` (byte tokenizer)."""
    import tempfile

    from .tiny import APP, tiny_components, tokenizers, write_tokenizer

    shape = shape or APP
    parts = tiny_components(arch, seed, shape)
    encs = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if arch == "sdxl" else [])
    with tempfile.TemporaryDirectory(prefix="std-tok-") as folder:  # the tokenizers read their files into memory
        toks = tokenizers(write_tokenizer(folder), arch)
    return Base(parts["unet"], parts["vae"], encs, toks, arch, DiscreteSchedule(), "tiny",
                float(parts["vae"].config.scaling_factor), 0.0, [], "tiny", dict(SD_SCHEDULER))


def encode_prompts(base: Base, captions: list[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """prompt_embeds [B,77,C], pooled [B,P] (discriminator condition; SDXL text_embeds) and SDXL time_ids [B,6]."""
    device = next(base.text_encoders[0].parameters()).device
    hidden, pooled = [], None
    for tok, enc in zip(base.tokenizers, base.text_encoders):
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length if tok.model_max_length < 1000
                  else 77, truncation=True, return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        if base.arch == "sdxl":
            hidden.append(out.hidden_states[-2])
            pooled = out[0] if enc is base.text_encoders[-1] else pooled
        else:
            hidden.append(out.last_hidden_state)
            pooled = out.pooler_output
    result = {"prompt_embeds": torch.cat(hidden, dim=-1).float(), "pooled": pooled.float()}
    if base.arch == "sdxl":
        result["time_ids"] = time_ids(size, size, (0, 0), len(captions)).to(device)
    return result


def time_ids(original: tuple[int, int], target: tuple[int, int], crop: tuple[int, int], n: int = 1) -> torch.Tensor:
    """SDXL's size conditioning (original h, w, crop top, left, target h, w), [n, 6] float32."""
    return torch.tensor([[*original, *crop, *target]], dtype=torch.float32).repeat(n, 1)


def unet_kwargs(base: Base, ctx: dict[str, torch.Tensor]) -> dict:
    dtype = base.unet.dtype
    kw = {"encoder_hidden_states": ctx["prompt_embeds"].to(dtype)}
    if base.arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": ctx["pooled"].to(dtype), "time_ids": ctx["time_ids"].to(dtype)}
    return kw


# --------------------------------------------------------------------------------------------------------------------
# As a diffusers pipeline (the app's container)

def scheduler_for(config: dict):
    """A diffusers DDIM scheduler with the base's training schedule (the app only reads its config)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(SD_SCHEDULER | config), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def as_pipeline(base: Base):
    """A ``StableDiffusion(XL)Pipeline`` around the loaded modules (no safety checker, no image encoder yet)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
                  scheduler=scheduler_for(base.scheduler_config))
    if base.arch == "sdxl":
        return StableDiffusionXLPipeline(**common, text_encoder_2=base.text_encoders[1],
                                         tokenizer_2=base.tokenizers[1])
    return StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
