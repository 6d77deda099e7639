"""STD inference through diffusers modules with the project's own plan, sampler and video path.

The pipeline is only a container: the content is VAE-encoded, noised at the first sigma of the STD plan
(:func:`comfyui_std.core.std_plan`, explicit timesteps, not diffusers' strength arithmetic) and denoised by
:func:`comfyui_std.core.stylize.stylize_latents` (the STD sampler, shared noise and chunking the ComfyUI video node
uses) with a :class:`~comfyui_std.core.KDenoiser` around the UNet and classifier-free guidance. The style reference
goes through diffusers' IP-Adapter with the shared style-block preset (:func:`diffusers_ip_scale`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from comfyui_std.core import DiscreteSchedule, KDenoiser, STDInputError, STDPlan, check_range, std_plan
from comfyui_std.core.chunks import Chunking
from comfyui_std.core.frames import resize_frames
from comfyui_std.core.images import image_to_float
from comfyui_std.core.plan import check_nfe, check_start_strength, teacher_plan
from comfyui_std.core.stream import StreamReport, stylize_video_file
from comfyui_std.core.style_blocks import diffusers_ip_scale
from comfyui_std.core.stylize import std_chunk_runner, stylize_latents
from comfyui_std.core.vp import guidance
from std_hf.base import LatentCodec
from std_hf.ip_adapter import image_embeds
from std_hf.lora import check_lora_fits, read_lora
from std_hf.memory import (
    TILE_PIXELS,
    MemoryPlan,
    check_offload,
    device_budget,
    module_bytes,
    plan_memory,
)

from .media import MIN_SIDE, fit_size, run_record
from .models import LoraCatalog, LoraEntry, architecture
from .settings import StyleSettings

log = logging.getLogger("std_app")
#: the most frames :meth:`STDEngine.run_video_file` stylizes from one file (about an hour at 30 fps); front ends
#: state their own, lower limit with ``max_frames``
MAX_VIDEO_FRAMES = 100_000
#: the motion-module choice that stylizes a video frame by frame (the module bypassed)
NO_MOTION = "none (frame by frame)"


def app_plan(nfe, start_strength, plan: str = "official") -> STDPlan:
    """The STD plan the app runs: the core plan, the one the ComfyUI nodes compute for the same settings."""
    return std_plan(check_nfe(nfe), check_start_strength(start_strength), plan or "official")


def resolve_start_strength(entry: LoraEntry | None, start_strength, snap: bool) -> tuple[float, str | None]:
    """The η to run and a notice for the user.

    With ``snap`` (the default in the UI) a LoRA that knows its trained η gets exactly that η, and the user is told
    when the requested one differed; without it the requested η runs, with the core's mismatch warning.
    """
    eta = check_start_strength(start_strength)
    if entry is None or entry.eta is None:
        return eta, None
    if not snap:
        return eta, entry.eta_warning(eta)
    if abs(entry.eta - eta) > 1e-3:
        return entry.eta, (f"start strength η {eta:g} was snapped to {entry.eta:g}, the η {entry.name} was trained "
                           f"for (untick 'Snap η to the LoRA' under Advanced to run {eta:g} anyway)")
    return entry.eta, None


@dataclass
class Branch:
    """One classifier-free-guidance branch: text tokens, SDXL's added conditions, IP-Adapter image embeddings."""

    text: torch.Tensor                       # [1, tokens, width]
    added: dict = field(default_factory=dict)  # SDXL: text_embeds [1, P], time_ids [1, 6]
    image: torch.Tensor | None = None        # [1, 1, E] when an IP-Adapter is attached


@dataclass
class RunResult:
    frames: torch.Tensor   # [N, H, W, 3] float 0..1 on the CPU
    plan: STDPlan
    seconds: float
    settings: StyleSettings
    lora: LoraEntry | None


@dataclass(kw_only=True)
class VideoRunResult(StreamReport):
    """What :meth:`STDEngine.run_video_file` wrote: the stream's report (``path``, ``frames``, ``fps``, ``width``,
    ``height``, ``chunks``, ``audio``, ``notices``, with the engine's notices added) and the run's settings.

    ``seconds`` is the engine's wall time for the whole run (text encoding, the stream, the CUDA sync);
    ``stream_seconds`` the stream's own (the report's ``seconds``)."""

    stream_seconds: float
    plan: STDPlan
    settings: StyleSettings
    lora: LoraEntry | None
    record: dict  # the settings record written into the file's "comment" tag (JSON)

    @classmethod
    def from_report(cls, report: StreamReport, notices: list[str], *, seconds: float, **run) -> "VideoRunResult":
        values = {f.name: getattr(report, f.name) for f in dataclasses.fields(StreamReport)}
        values.update(seconds=seconds, stream_seconds=report.seconds, notices=[*report.notices, *notices])
        return cls(**values, **run)


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


class STDEngine:
    """A loaded base pipeline with its STD LoRAs and optional style reference, ready to stylize frames.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        catalog: the STD LoRAs on offer.
        base_label: the base model's name, for messages and metadata.
        style: a description of the attached IP-Adapter, or ``None`` when there is none.
        max_loaded_loras: LoRAs kept loaded at once (least recently used ones are unloaded).
        device: where the work runs (default: where the UNet is).
        offload: the placement of the memory plan (:mod:`std_hf.memory`): ``none`` (every component on
            ``device``), ``model`` (each component moves to ``device`` for its stage and back to the CPU after),
            ``sequential`` (weights stream to ``device`` layer by layer) or ``auto`` (the plan's choice for the
            model's native size; :attr:`start_plan` says what was chosen).
        vram_budget: bytes a run may use on ``device`` (None: the CUDA device's free memory, no limit elsewhere);
            each run plans its VAE sub-batch and tiling from it.
        fuse_loras: fuse the active STD LoRA into the UNet's weights for the runs (no per-layer adapter cost; the
            weights are restored when the LoRA, its scale or the teacher is asked for).
        motion: the motion module inserted into ``pipe.unet`` (a diffusers ``UNetMotionModel``), or None. Videos
            then run as the v2v LoRAs were trained: each chunk is one clip through the motion modules, and a v2v
            LoRA is applied whole, its motion layers fused into the motion modules. Images skip the motion modules
            (each image a clip of one frame with the modules bypassed: the image UNet's output).
    """

    def __init__(self, pipe, catalog: LoraCatalog, base_label: str, style: str | None = None,
                 max_loaded_loras: int = 2, *, device: torch.device | str | None = None, offload: str = "none",
                 vram_budget: int | None = None, fuse_loras: bool = True, motion=None, motion_folder=None):
        self.pipe = pipe
        self.motion = motion
        self.motion_folder = motion_folder          # models/animatediff_models: the modules a run may switch to
        self._motion_raw: dict[str, tuple] = {}     # adapter name -> (motion tensors, metadata, LoRA name)
        self._motion_layers: dict[str, dict] = {}   # adapter name -> its motion LoRA layers (for self.motion)
        self._motion_fused = None                   # (adapter name, scale, FusedMotionLora) while fused
        self.exec_device = torch.device(device) if device is not None else pipe.unet.device
        self.offload = check_offload(offload)
        self.vram_budget = vram_budget
        self.fuse_loras = fuse_loras
        self._fused: tuple[str, float] | None = None
        self._on_device: set[str] = set()  # components placed for the current stage (model offload)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.native_size = int(pipe.unet.config.sample_size) * self.vae_scale
        #: the plan at the model's native size, made before placing the components (it resolves ``auto``)
        self.start_plan = self.memory_plan(self.native_size, self.native_size)
        self.offload = self.start_plan.offload
        if motion is not None and self.offload == "sequential":
            raise STDInputError("offload", "a motion module runs with --offload none or model (sequential offload "
                                           "keeps the weights the motion LoRA is fused into off the device); "
                                           f"the plan chose sequential ({self.start_plan.describe()}): pass "
                                           "--offload model")
        self._place_components()
        self.catalog = catalog
        self.base_label = base_label
        self.style = style
        self.arch = architecture(pipe)
        self.schedule = DiscreteSchedule.from_config(pipe.scheduler.config)
        self.codec = LatentCodec(pipe.vae, float(pipe.vae.config.scaling_factor), device=self.exec_device)
        self.max_loaded_loras = max_loaded_loras
        self._loaded: OrderedDict[str, LoraEntry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        """Where the work runs (components may live on the CPU between stages under offload)."""
        return self.exec_device

    # Memory -------------------------------------------------------------------------------------------------------
    def components(self) -> dict:
        """The pipeline's modules by stage name."""
        pipe = self.pipe
        mods = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": getattr(pipe, "text_encoder", None),
                "text_encoder_2": getattr(pipe, "text_encoder_2", None),
                "image_encoder": getattr(pipe, "image_encoder", None)}
        return {k: v for k, v in mods.items() if v is not None}

    def _place_components(self) -> None:
        """Put the components where the placement says: all on the device (``none``), on the CPU until their stage
        (``model``: :meth:`placed` moves each to the device for its stage and back, as diffusers'
        ``enable_model_cpu_offload`` does with hooks), or behind diffusers' sequential offload hooks (weights
        stream to the device layer by layer)."""
        if self.offload == "none":
            self.pipe.to(self.exec_device)
        elif self.offload == "model":
            self.pipe.to("cpu")
        else:
            self._sequential_hooks()

    def _sequential_hooks(self) -> None:
        """Sequential offload: accelerate's per-layer hooks on the UNet and the VAE (weights stream to the device
        layer by layer); the text and image encoders, run once per request, move whole for their stage as under
        model offload (accelerate's hooks do not take transformers' CLIP parameters here)."""
        from accelerate import cpu_offload

        self.pipe.to("cpu")
        for name in ("unet", "vae"):
            cpu_offload(self.components()[name], execution_device=self.exec_device)

    @contextmanager
    def placed(self, *names: str):
        """The named components on the device for the block and back on the CPU after, under model offload (and
        the text and image encoders under sequential offload); ``none`` leaves everything where it is."""
        if self.offload == "none":
            yield
            return
        whole = ("unet", "vae") if self.offload == "model" else ()
        moved = [n for n in self.components()
                 if n in names and n not in self._on_device and (n in whole or n not in ("unet", "vae"))]
        for n in moved:
            self.components()[n].to(self.exec_device)
            self._on_device.add(n)
        try:
            yield
        finally:
            for n in moved:  # a nested block leaves what an outer one placed
                self.components()[n].to("cpu")
                self._on_device.discard(n)

    def memory_plan(self, height: int, width: int, frames_per_batch: int = 1) -> MemoryPlan:
        """The VAE sub-batch and tiling for frames of this size under the engine's budget and placement."""
        budget = self.vram_budget if self.vram_budget is not None else device_budget(self.exec_device)
        sizes = {k: module_bytes(v) for k, v in self.components().items()}
        vae_param = next(self.pipe.vae.parameters())
        return plan_memory(sizes, (height, width), device=self.exec_device, budget=budget, offload=self.offload,
                           vae_channels=int(self.pipe.vae.config.block_out_channels[0]), vae_dtype=vae_param.dtype,
                           unet_dtype=self.pipe.unet.dtype, frames_per_batch=frames_per_batch,
                           dtypes={"UNet": self.pipe.unet.dtype, "VAE": vae_param.dtype})

    # Plan ---------------------------------------------------------------------------------------------------------
    def sigmas(self, plan: STDPlan) -> torch.Tensor:
        """The noise levels the sampler visits: the plan's timesteps on this model's schedule, then 0."""
        return plan.sigmas(self.schedule)

    # LoRA ---------------------------------------------------------------------------------------------------------
    def use_lora(self, entry: LoraEntry | None, scale: float) -> None:
        """Make ``entry`` the only active adapter (loading it on first use), or run the base model when ``None``.

        With ``fuse_loras`` the active LoRA's weights are fused into the UNet and text encoders (as ComfyUI patches
        them): a run then costs what the bare model costs. Switching the LoRA or its scale, or running the teacher,
        unfuses first, so the weights are the base model's again."""
        wanted = None if entry is None else (entry.adapter_name, float(scale))
        if self._motion_fused is not None and self._motion_fused[:2] != wanted:
            self._unfuse_motion()
        if self._fused is not None and self._fused != wanted:
            self._unfuse()
        if entry is None:
            if self._loaded:
                self.pipe.disable_lora()
            return
        if self._fused == wanted:
            self._fuse_motion(entry, wanted)
            return
        if entry.adapter_name not in self._loaded:
            self._load_lora(entry)
        self._loaded.move_to_end(entry.adapter_name)
        self.pipe.enable_lora()
        self.pipe.set_adapters([entry.adapter_name], adapter_weights=[float(scale)])
        while len(self._loaded) > self.max_loaded_loras:
            name, _ = self._loaded.popitem(last=False)
            self.pipe.delete_adapters([name])
        if self.fuse_loras and self.offload != "sequential":  # sequential offload keeps weights off the device
            self.pipe.fuse_lora(adapter_names=[entry.adapter_name], lora_scale=1.0)
            self._fused = wanted
        self._fuse_motion(entry, wanted)

    def _fuse_motion(self, entry: LoraEntry, wanted: tuple[str, float]) -> None:
        """Fuse the active v2v LoRA's motion layers into the motion modules (once; restored by _unfuse_motion)."""
        layers = self._motion_layers.get(entry.adapter_name)
        if layers and self._motion_fused is None:
            from std_hf.motion import FusedMotionLora

            self._motion_fused = (*wanted, FusedMotionLora(self.pipe.unet, layers, wanted[1]))

    def _unfuse(self) -> None:
        self.pipe.unfuse_lora()
        self._fused = None

    def _fit_motion_lora(self, adapter: str) -> None:
        """The motion layers of a loaded v2v LoRA for the current motion module (refused when they do not fit)."""
        from std_hf.motion import motion_lora

        tensors, metadata, name = self._motion_raw[adapter]
        layers = motion_lora(self.pipe.unet, tensors, metadata, name, f"{self.motion.info.label()} "
                                                                      f"'{self.motion.name}'")
        self._motion_layers[adapter] = layers
        logging.getLogger("std_app.motion").info("LoRA %s: motion LoRA: %d/%d tensors applied to the motion module %s",
                                                 name, 2 * len(layers), len(tensors), self.motion.name)

    # Motion modules -----------------------------------------------------------------------------------------------
    def motion_modules(self) -> list[str]:
        """The motion modules a video run may use: the loaded one first, then the other files of the
        animatediff_models folder (a switch loads one whose structure fits the loaded one)."""
        if self.motion is None:
            return []
        from std_hf.motion import PICKLED

        names = [self.motion.name]
        folder = self.motion_folder
        if folder is not None and folder.is_dir():
            names += sorted(p.name for p in folder.iterdir() if p.name != self.motion.name and p.is_file()
                            and p.suffix in (".safetensors", *PICKLED))
        return names

    def _switch_motion(self, name: str) -> None:
        """Load motion module ``name`` (a file of :meth:`motion_modules`) into the motion model in place of the
        current one: same base and structure (channels, modules per block, mid block), any context length. The
        loaded v2v LoRAs' motion layers are fitted to it again."""
        from comfyui_std.core.motion_format import check_base
        from std_hf.motion import load_motion_adapter

        if name == self.motion.name:
            return
        if name not in self.motion_modules():
            raise STDInputError("motion_module", f"'{name}' is not one of the motion modules on offer "
                                                 f"({', '.join(self.motion_modules())})")
        module = load_motion_adapter(str(self.motion_folder / name))
        check_base(module.info, self.arch, module.name, self.base_label)
        shape = (lambda i: (i.block_channels, i.layers_per_block, i.mid_block))
        if shape(module.info) != shape(self.motion.info):
            raise STDInputError("motion_module", f"'{name}' ({module.info.label()}) is built otherwise than the "
                                                 f"loaded '{self.motion.name}' (channels, modules per block or mid "
                                                 "block); restart the app with --motion-module "
                                                 f"{name} to use it")
        if self._motion_fused is not None:
            self._unfuse_motion()
        targets = dict(self.pipe.unet.named_parameters())
        targets.update(self.pipe.unet.named_buffers())
        new = module.adapter.state_dict()
        missing = sorted(set(new) - set(targets))
        if missing:
            raise STDInputError("motion_module", f"'{name}': {len(missing)} tensors have no place in the motion "
                                                 f"model (e.g. {missing[0]})")
        old = (self.motion, {k: targets[k].detach().clone() for k in new})
        try:
            with torch.no_grad():
                for key, value in new.items():
                    owner, leaf = key.rsplit(".", 1)
                    module_ = self.pipe.unet.get_submodule(owner)
                    current = getattr(module_, leaf)
                    if current.shape == value.shape:
                        current.copy_(value.to(current.device, current.dtype))
                    else:  # a positional table of another length: a buffer, replaced
                        setattr(module_, leaf, value.to(current.device, current.dtype))
            self.motion = module
            for adapter in list(self._motion_raw):
                self._fit_motion_lora(adapter)
        except BaseException:
            self.motion = old[0]
            with torch.no_grad():
                for key, value in old[1].items():
                    owner, leaf = key.rsplit(".", 1)
                    setattr(self.pipe.unet.get_submodule(owner), leaf, value) if leaf == "pe" else \
                        getattr(self.pipe.unet.get_submodule(owner), leaf).copy_(value)
            for adapter in list(self._motion_raw):
                self._fit_motion_lora(adapter)
            raise
        logging.getLogger("std_app.motion").info("motion module %s: %s", module.name, module.line())

    def _unfuse_motion(self) -> None:
        self._motion_fused[2].restore(self.pipe.unet)
        self._motion_fused = None

    def _load_lora(self, entry: LoraEntry) -> None:
        if not entry.path.exists():
            raise STDInputError("lora", f"'{entry.path}' is gone; put the file back or restart the app")
        state_dict, metadata = read_lora(entry.path, "lora")  # a corrupt file is a message, not a SafetensorError
        texts = [m for m in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if m is not None]
        motion = set(check_lora_fits(self.pipe.unet, texts, state_dict, entry.name, metadata, self.base_label))
        if motion and self.motion is None:  # a v2v LoRA's motion-module layers, with no motion module to take them
            log.warning("LoRA %s: its %d motion-module tensors are not applied: no motion module is loaded, so "
                        "videos run frame by frame; start with --motion-module (the module it was trained with, "
                        "from models/animatediff_models) to run it as trained", entry.name, len(motion))
        elif motion:
            self._motion_raw[entry.adapter_name] = ({k: state_dict[k] for k in motion}, metadata, entry.name)
            self._fit_motion_lora(entry.adapter_name)
        state_dict = {k: v for k, v in state_dict.items() if k not in motion}
        sequential = self.offload == "sequential"
        if sequential:  # the weights come back from the offload hooks while the LoRA is added
            from accelerate.hooks import remove_hook_from_module

            for name in ("unet", "vae"):
                remove_hook_from_module(self.components()[name], recurse=True)
        try:
            with warnings.catch_warnings():  # several adapters on one model is what the app does on purpose
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(state_dict, adapter_name=entry.adapter_name)
        except Exception as err:  # diffusers/peft raise many types for files they cannot map
            if entry.adapter_name in getattr(self.pipe.unet, "peft_config", {}):
                self.pipe.delete_adapters([entry.adapter_name])
            reason = str(err).splitlines()[0] if str(err) else ""
            raise STDInputError("lora", f"'{entry.name}' could not be applied to {self.base_label} "
                                        f"({type(err).__name__}: {reason})") from None
        finally:
            if sequential:
                self._sequential_hooks()
        self._loaded[entry.adapter_name] = entry

    @contextmanager
    def lora_disabled(self):
        """Run the base model (the teacher) inside the block, whatever adapter is active."""
        if not self._loaded:
            yield
            return
        if self._fused is not None:
            self._unfuse()
        if self._motion_fused is not None:
            self._unfuse_motion()
        self.pipe.disable_lora()
        try:
            yield
        finally:
            self.pipe.enable_lora()

    # Conditioning -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def branches(self, settings: StyleSettings, height: int, width: int, style_image=None) -> list[Branch]:
        """[negative, positive] branches when cfg > 1, else [positive] (cfg <= 1 disables the negative branch)."""
        with self.placed("text_encoder", "text_encoder_2", "image_encoder"):
            return self._branches(settings, height, width, style_image)

    def _branches(self, settings: StyleSettings, height: int, width: int, style_image=None) -> list[Branch]:
        pipe, guided = self.pipe, settings.cfg > 1.0
        dtype = pipe.unet.dtype
        if self.arch == "sdxl":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                settings.prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=settings.negative_prompt)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=self.device)
            added = [{"text_embeds": neg_pooled, "time_ids": time_ids}, {"text_embeds": pooled, "time_ids": time_ids}]
        else:
            pos, neg = pipe.encode_prompt(settings.prompt, self.device, 1, guided,
                                          negative_prompt=settings.negative_prompt)
            added = [{}, {}]
        images = self._style_embeds(settings, style_image)
        out = [Branch(pos.to(dtype), added[1], images[1])]
        if guided:
            out.insert(0, Branch(neg.to(dtype), added[0], images[0]))
        return out

    def _style_embeds(self, settings: StyleSettings, style_image) -> tuple:
        """(negative, positive) IP-Adapter image embeddings [1, 1, E]; zeros and scale 0 without a style image."""
        if self.style is None:
            if style_image is not None:
                raise STDInputError("style image", "no IP-Adapter is loaded, so a style reference cannot be used; "
                                                   "start the app with --ip-adapter and --image-encoder (or put them "
                                                   "in the models folder's ipadapter/ and clip_vision/)")
            return None, None
        pipe = self.pipe
        width = pipe.image_encoder.config.projection_dim
        if style_image is None:
            pipe.set_ip_adapter_scale(0.0)
            zeros = torch.zeros(1, 1, width, dtype=pipe.unet.dtype, device=self.device)
            return zeros, zeros
        pipe.set_ip_adapter_scale(diffusers_ip_scale(settings.style_preset, self.arch, settings.style_weight))
        rgb, _, _ = image_to_float(style_image, "style image")  # 8-bit RGB from the handlers: exact
        embeds = image_embeds(pipe.image_encoder, rgb)[:, None].to(pipe.unet.dtype)
        return torch.zeros_like(embeds), embeds

    def denoiser(self, branches: list[Branch], cfg: float, clip: bool = False) -> KDenoiser:
        """The k-diffusion denoiser: UNet on all branches in one batch, guidance on the network output. With a
        motion module the batch is one clip (``clip``: the frames attend to each other through the motion modules)
        or single-frame clips with the modules bypassed (images)."""
        unet = self.pipe.unet
        if self.motion is not None:
            return KDenoiser(self._motion_network(branches, cfg, clip), self.schedule)

        def network(x, t):
            b, n = x.shape[0], len(branches)
            x_in = torch.cat([x] * n).to(unet.dtype)
            text = torch.cat([br.text.expand(b, -1, -1) for br in branches])
            added = {k: torch.cat([br.added[k].expand(b, -1) for br in branches]) for k in branches[0].added}
            if branches[0].image is not None:
                added["image_embeds"] = [torch.cat([br.image.expand(b, -1, -1) for br in branches])]
            out = unet(x_in, torch.cat([t] * n), encoder_hidden_states=text, added_cond_kwargs=added or None,
                       return_dict=False)[0].float()
            if n == 1:
                return out
            uncond, cond = out.chunk(2)
            return guidance(uncond, cond, cfg)

        return KDenoiser(network, self.schedule)

    def _motion_network(self, branches: list[Branch], cfg: float, clip: bool):
        unet, n = self.pipe.unet, len(branches)

        def network(x, t):
            frames = x.shape[0]
            if clip:  # [n branches, C, frames, H, W]: one clip per branch, one timestep for all its frames
                if not bool((t == t[0]).all()):
                    raise STDInputError("noise", "a clip through the motion module needs one noise level for all "
                                                 "its frames")
                x_in = torch.stack([x] * n).movedim(1, 2).to(unet.dtype)
                per, steps = 1, t[:1].repeat(n)
            else:  # images: every frame its own one-frame clip, the motion modules bypassed
                x_in = torch.cat([x] * n)[:, :, None].to(unet.dtype)
                per, steps = frames, torch.cat([t] * n)
            text = torch.cat([br.text.expand(per, -1, -1) for br in branches])
            added = {k: torch.cat([br.added[k].expand(per, -1) for br in branches]) for k in branches[0].added}
            if branches[0].image is not None:
                added["image_embeds"] = [torch.cat([br.image.expand(per, -1, -1) for br in branches])]
            length = x_in.shape[2]
            with self._motion_bypassed(not clip):
                out = unet(x_in, steps, encoder_hidden_states=text.repeat_interleave(length, dim=0),
                           added_cond_kwargs=added or None, return_dict=False)[0].float()
            out = out.movedim(2, 1).reshape(n * frames, *x.shape[1:]) if clip else out[:, :, 0]
            if n == 1:
                return out
            uncond, cond = out.chunk(2)
            return guidance(uncond, cond, cfg)

        return network

    def check_clip(self, chunking: Chunking, frames: int | None = None) -> None:
        """Refuse chunks longer than the motion module's positional table (the frames it can attend over)."""
        if self.motion is None:
            return
        length = chunking.frames_per_batch or frames
        if length is not None and length > self.motion.info.max_frames:
            raise STDInputError("frames_per_batch", f"{length} frames in one chunk, but the "
                                                    f"{self.motion.info.label()} attends over at most "
                                                    f"{self.motion.info.max_frames}; lower frames_per_batch")

    @contextmanager
    def _motion_bypassed(self, bypass: bool):
        """The motion modules pass their input through inside the block (``bypass``), else act."""
        if not bypass:
            yield
            return
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        modules = [m for m in self.pipe.unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
        for m in modules:
            m.forward = _identity
        try:
            yield
        finally:
            for m in modules:
                del m.forward

    # VAE ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames: torch.Tensor, batch: int) -> torch.Tensor:
        """Frames [N, H, W, 3] in 0..1 -> scaled latents [N, 4, H/8, W/8] (float32; the posterior mean), VAE in
        blocks of ``batch`` (the trainer's codec, :class:`std_hf.base.LatentCodec`)."""
        with self.placed("vae"):
            return self.codec.encode(frames.permute(0, 3, 1, 2) * 2 - 1, batch=batch)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int) -> torch.Tensor:
        """Scaled latents -> frames [N, H, W, 3] in 0..1, float32 on the CPU (each block moved there at once)."""
        with self.placed("vae"):
            pixels = self.codec.decode(latents, batch=batch, device="cpu")
        return ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()

    # Runs ---------------------------------------------------------------------------------------------------------
    def onestep_sigmas(self, t_init: int) -> torch.Tensor:
        """[σ(t_init), 0]: a SiD-LSG generator is one deterministic step from noise at t_init (as SiDSchedule)."""
        t_init = check_range("t_init", t_init, 1, self.schedule.num_train_timesteps - 1, kind=int)
        return torch.stack([self.schedule.sigma(torch.tensor(float(t_init))).float(), torch.tensor(0.0)])

    def generate(self, settings: StyleSettings, height: int, width: int, batch: int, t_init: int) -> RunResult:
        """One-step text-to-image with a SiD-LSG generator LoRA (guidance is distilled in: cfg 1, no negative)."""
        settings = dataclasses.replace(settings, cfg=1.0, gamma=0.0, negative_prompt="").validated()
        entry = self.catalog.get(settings.lora)
        if entry is None or entry.kind != "onestep":
            raise STDInputError("lora", "choose a SiD-LSG one-step LoRA (trained with python -m training.sid_lsg)")
        batch = check_range("batch_size", batch, 1, 16, kind=int)
        sigmas = self.onestep_sigmas(t_init)
        plan = STDPlan((int(t_init),), 1, 1.0, "sid_lsg one-step")
        with self._lock:
            start = time.perf_counter()
            self.use_lora(entry, settings.lora_scale)
            branches = self.branches(settings, height, width)
            channels = int(self.pipe.unet.config.in_channels)
            latents = torch.zeros(batch, channels, height // self.vae_scale, width // self.vae_scale,
                                  device=self.device)
            with self.placed("unet"):
                out = stylize_latents(self.denoiser(branches, 1.0), latents, sigmas, settings.seed,
                                      Chunking(None, noise="per_frame"), schedule=self.schedule, disable=False)
            memory = self.memory_plan(height, width, batch)
            with self.vae_tiling(None, planned=memory.vae_tiling):
                images = self.decode(out, memory.vae_calls(batch))
            seconds = time.perf_counter() - start
        return RunResult(images, plan, seconds, settings, entry)

    def run(self, frames: torch.Tensor, settings: StyleSettings, style_image=None, *, teacher_steps: int | None = None,
            chunking: Chunking = Chunking(None), progress_bar: bool = True, clip: bool | None = None) -> RunResult:
        """Stylize frames [N, H, W, 3] (an image is N = 1) with STD, or with the teacher when ``teacher_steps``.

        The teacher is the base model without the LoRA, run for ``teacher_steps`` DDIM steps from the same start
        timestep (:func:`comfyui_std.core.plan.teacher_plan`). Frames are sampled in the chunks of ``chunking``
        (default: all at once, shared noise) with the shared video path of the core. With a motion module, each
        chunk runs as one clip through it when ``clip`` (default: when ``chunking`` has ``frames_per_batch``, a
        video; the streamed path does the same), else the frames are separate images.
        """
        settings = settings.validated()
        entry = self.catalog.get(settings.lora)
        plan = app_plan(settings.nfe, settings.start_strength, settings.plan)
        if teacher_steps is not None:
            plan = teacher_plan(plan.start_timestep, teacher_steps, plan.start_strength)
        batch = chunking.batch(frames.shape[0])
        clip = chunking.frames_per_batch is not None if clip is None else clip
        if clip:
            self.check_clip(chunking, frames.shape[0])
        memory = self.memory_plan(frames.shape[1], frames.shape[2], batch)
        vae_batch = memory.vae_calls(batch)  # the VAE's frames per call: the plan's, within a sampler chunk
        with self._lock:
            start = time.perf_counter()
            self.use_lora(entry, settings.lora_scale)
            context = self.lora_disabled() if teacher_steps is not None else nullcontext()
            with context, self.vae_tiling(None, planned=memory.vae_tiling):
                branches = self.branches(settings, frames.shape[1], frames.shape[2], style_image)
                latents = self.encode(frames, vae_batch)
                with self.placed("unet"):
                    out = stylize_latents(self.denoiser(branches, settings.cfg, clip), latents, self.sigmas(plan),
                                          settings.seed, chunking, gamma=settings.gamma, schedule=self.schedule,
                                          disable=not progress_bar)
                images = self.decode(out, vae_batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return RunResult(images, plan, seconds, settings, None if teacher_steps is not None else entry)


    # Streamed video -----------------------------------------------------------------------------------------------
    @contextmanager
    def vae_tiling(self, enabled: bool | None, planned: bool = False):
        """Tiled VAE encode/decode (diffusers' ``enable_tiling``) inside the block; the previous setting is restored
        after. Diffusers tiles only frames larger than its tile (1024 px for SDXL); when the memory plan tiles
        (``planned``: one frame does not fit) the tile is :data:`std_hf.memory.TILE_PIXELS` a side, at any size.
        ``enabled=None`` without ``planned`` leaves the setting as it is."""
        vae = self.pipe.vae
        before = bool(getattr(vae, "use_tiling", False))
        sizes = {k: getattr(vae, k) for k in ("tile_sample_min_size", "tile_latent_min_size") if hasattr(vae, k)}
        if planned and sizes:
            vae.tile_sample_min_size = TILE_PIXELS
            vae.tile_latent_min_size = TILE_PIXELS // self.vae_scale
        if enabled or planned:
            vae.enable_tiling()
        elif enabled is not None:
            vae.disable_tiling()
        try:
            yield
        finally:
            vae.enable_tiling() if before else vae.disable_tiling()
            for k, v in sizes.items():
                setattr(vae, k, v)

    def run_video_file(self, source, output, settings: StyleSettings, style_image=None, *, size: int | None = None,
                       chunking: Chunking = Chunking(), frame_load_cap: int = 0,
                       skip_first_frames: int = 0, select_every_nth: int = 1, force_rate: float = 0.0,
                       max_frames: int = MAX_VIDEO_FRAMES, tiled_vae: bool = False, audio: bool = True,
                       fmt: str | None = None, record: dict | None = None, progress=None,
                       motion_module: str | None = None) -> VideoRunResult:
        """Stylize a video file into ``output`` chunk by chunk (:func:`comfyui_std.core.stream.stylize_video_file`):
        memory follows ``chunking.frames_per_batch``, not the clip length, and the frames equal :meth:`run` on the
        same frames with the same settings (the VAE runs in blocks of ``frames_per_batch`` in both).

        Args:
            source: a video file (mp4, webm, mov, mkv, avi, gif) or a folder of frames.
            output: the file to write; its container is ``fmt`` or the source's (a folder gives mp4). Written to a
                temporary name and renamed when complete: on any error nothing is left behind.
            settings, style_image: as :meth:`run`.
            size: long side of the output in pixels (aspect kept, sides multiples of the VAE's 8); None keeps the
                source size (snapped to multiples of 8).
            chunking: frames per chunk, overlap and noise policy (as the ComfyUI video node).
            frame_load_cap, skip_first_frames, select_every_nth, force_rate: the frame selection of
                :func:`~comfyui_std.core.video.load_video`; ``frame_load_cap`` 0 means up to ``max_frames``.
            max_frames: the most frames stylized (longer clips are cut, with a notice).
            tiled_vae: encode and decode in tiles (large frames on a small GPU).
            audio: keep the source's audio (copied, or re-encoded when the container needs it).
            record: extra fields for the settings record written into the file.
            progress: ``progress(frames_done, frames_total_or_None)`` after every chunk.
            motion_module: with a motion model loaded, one of :meth:`motion_modules` to run this video with
                (switched in place), :data:`NO_MOTION` to stylize frame by frame, None for the loaded one.
        """
        settings = settings.validated()
        frame_by_frame = motion_module == NO_MOTION
        if motion_module is not None and not frame_by_frame and self.motion is None:
            raise STDInputError("motion_module", "no motion module is loaded; start with --motion-module to choose one")
        if chunking.frames_per_batch is None:
            raise STDInputError("frames_per_batch", "a video file is stylized in chunks: set frames_per_batch")
        frames_per_batch = chunking.frames_per_batch
        max_frames = check_range("max_frames", max_frames, 1, MAX_VIDEO_FRAMES, kind=int)
        cap = check_range("frame_load_cap", frame_load_cap, 0, max_frames, kind=int) or max_frames
        if size is not None:
            size = check_range("size", size, MIN_SIDE, 16384, kind=int)
        entry = self.catalog.get(settings.lora)
        plan = app_plan(settings.nfe, settings.start_strength, settings.plan)
        from comfyui_std.core.video import open_video

        with open_video(source, cap, skip_first_frames, select_every_nth, force_rate, "none") as reader:
            info = reader.info
            width, height = fit_size(info.width, info.height, size or max(info.width, info.height), self.vae_scale)
            notices = []
            if not frame_load_cap and (info.selectable_frames or 0) > max_frames:
                notices.append(f"Only the first {max_frames} frames of '{info.path.name}' are stylized (the limit).")
            rec = run_record(settings, plan, (width, height), base_model=self.base_label, lora=entry,
                             style_used=style_image is not None,
                             **{"fps": info.fps, **chunking.as_dict(), "source": info.path.name, **(record or {})})
            with self._lock:
                start = time.perf_counter()
                if motion_module is not None and not frame_by_frame:
                    self._switch_motion(motion_module)
                if not frame_by_frame:
                    self.check_clip(chunking)
                if self.motion is not None:
                    rec["motion_module"] = None if frame_by_frame else self.motion.name
                self.use_lora(entry, settings.lora_scale)
                memory = self.memory_plan(height, width, frames_per_batch)
                vae_batch = memory.vae_calls(frames_per_batch)  # the same blocks as run() on these frames
                with self.vae_tiling(tiled_vae, planned=memory.vae_tiling):
                    branches = self.branches(settings, height, width, style_image)
                    run_chunk = std_chunk_runner(self.denoiser(branches, settings.cfg, not frame_by_frame),
                                                 self.sigmas(plan),
                                                 settings.seed, chunking.noise, gamma=settings.gamma,
                                                 schedule=self.schedule, disable=True)
                    with self.placed("unet", "vae"):  # both alternate chunk by chunk
                        report: StreamReport = stylize_video_file(
                            reader, output, seed=settings.seed, chunking=chunking, vae_batch=vae_batch,
                            audio=audio, fmt=fmt, progress=progress,
                            encode=lambda f: self.encode(resize_frames(f, (width, height)), vae_batch),
                            run_chunk=run_chunk, decode=lambda z: self.decode(z, vae_batch),
                            metadata={"comment": json.dumps(rec, sort_keys=True)})
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
        return VideoRunResult.from_report(report, notices, plan=plan, seconds=seconds, settings=settings, lora=entry,
                                          record=rec)

