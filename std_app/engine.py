"""STD inference through diffusers modules with the project's own plan, sampler and video path.

The pipeline is only a container: the content is VAE-encoded, noised at the first sigma of the STD plan
(:func:`comfyui_std.core.std_plan`, explicit timesteps, not diffusers' strength arithmetic) and denoised by
:func:`comfyui_std.core.stylize.stylize_latents` (the STD sampler, shared noise and chunking the ComfyUI video node
uses) with a :class:`~comfyui_std.core.KDenoiser` around the UNet and classifier-free guidance. The style reference
goes through diffusers' IP-Adapter with the shared style-block preset (:func:`diffusers_ip_scale`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import dataclass, field
import torch

from comfyui_std.core import DiscreteSchedule, KDenoiser, STDInputError, STDPlan, check_range, std_plan
from comfyui_std.core.plan import check_nfe, check_start_strength, teacher_plan
from comfyui_std.core.chunks import Chunking
from comfyui_std.core.stylize import std_chunk_runner, stylize_latents
from comfyui_std.core.stream import StreamReport, stylize_video_file
from comfyui_std.core.images import image_to_float
from comfyui_std.core.style_blocks import diffusers_ip_scale
from std_hf.base import LatentCodec
from std_hf.ip_adapter import image_embeds
from std_hf.lora import check_lora_fits, read_lora

from .media import fit_size, resize_frames, run_record
from .models import LoraCatalog, LoraEntry, architecture
from .settings import StyleSettings

log = logging.getLogger("std_app")
#: the most frames :meth:`STDEngine.run_video_file` stylizes from one file (about an hour at 30 fps); front ends
#: state their own, lower limit with ``max_frames``
MAX_VIDEO_FRAMES = 100_000


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


class STDEngine:
    """A loaded base pipeline with its STD LoRAs and optional style reference, ready to stylize frames.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        catalog: the STD LoRAs on offer.
        base_label: the base model's name, for messages and metadata.
        style: a description of the attached IP-Adapter, or ``None`` when there is none.
        max_loaded_loras: LoRAs kept loaded at once (least recently used ones are unloaded).
    """

    def __init__(self, pipe, catalog: LoraCatalog, base_label: str, style: str | None = None,
                 max_loaded_loras: int = 2):
        self.pipe = pipe
        self.catalog = catalog
        self.base_label = base_label
        self.style = style
        self.arch = architecture(pipe)
        self.schedule = DiscreteSchedule.from_config(pipe.scheduler.config)
        self.codec = LatentCodec(pipe.vae, float(pipe.vae.config.scaling_factor))
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.native_size = int(pipe.unet.config.sample_size) * self.vae_scale
        self.max_loaded_loras = max_loaded_loras
        self._loaded: OrderedDict[str, LoraEntry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    # Plan ---------------------------------------------------------------------------------------------------------
    def sigmas(self, plan: STDPlan) -> torch.Tensor:
        """The noise levels the sampler visits: the plan's timesteps on this model's schedule, then 0."""
        return plan.sigmas(self.schedule)

    # LoRA ---------------------------------------------------------------------------------------------------------
    def use_lora(self, entry: LoraEntry | None, scale: float) -> None:
        """Make ``entry`` the only active adapter (loading it on first use), or run the base model when ``None``."""
        if entry is None:
            if self._loaded:
                self.pipe.disable_lora()
            return
        if entry.adapter_name not in self._loaded:
            self._load_lora(entry)
        self._loaded.move_to_end(entry.adapter_name)
        self.pipe.enable_lora()
        self.pipe.set_adapters([entry.adapter_name], adapter_weights=[float(scale)])
        while len(self._loaded) > self.max_loaded_loras:
            name, _ = self._loaded.popitem(last=False)
            self.pipe.delete_adapters([name])

    def _load_lora(self, entry: LoraEntry) -> None:
        if not entry.path.exists():
            raise STDInputError("lora", f"'{entry.path}' is gone; put the file back or restart the app")
        state_dict, metadata = read_lora(entry.path, "lora")  # a corrupt file is a message, not a SafetensorError
        texts = [m for m in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if m is not None]
        motion = set(check_lora_fits(self.pipe.unet, texts, state_dict, entry.name, metadata, self.base_label))
        if motion:  # a v2v LoRA's motion-module layers: the app runs the image UNet frame by frame
            log.warning("LoRA %s: its %d motion-module tensors are not applied (the app stylizes frame by frame, "
                        "without a motion module)", entry.name, len(motion))
            state_dict = {k: v for k, v in state_dict.items() if k not in motion}
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
        self._loaded[entry.adapter_name] = entry

    @contextmanager
    def lora_disabled(self):
        """Run the base model (the teacher) inside the block, whatever adapter is active."""
        if not self._loaded:
            yield
            return
        self.pipe.disable_lora()
        try:
            yield
        finally:
            self.pipe.enable_lora()

    # Conditioning -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def branches(self, settings: StyleSettings, height: int, width: int, style_image=None) -> list[Branch]:
        """[negative, positive] branches when cfg > 1, else [positive] (cfg <= 1 disables the negative branch)."""
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

    def denoiser(self, branches: list[Branch], cfg: float) -> KDenoiser:
        """The k-diffusion denoiser: UNet on all branches in one batch, guidance on the network output."""
        unet = self.pipe.unet

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
            return uncond + cfg * (cond - uncond)

        return KDenoiser(network, self.schedule)

    # VAE ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames: torch.Tensor, batch: int) -> torch.Tensor:
        """Frames [N, H, W, 3] in 0..1 -> scaled latents [N, 4, H/8, W/8] (float32; the posterior mean), VAE in
        blocks of ``batch`` (the trainer's codec, :class:`std_hf.base.LatentCodec`)."""
        return self.codec.encode(frames.permute(0, 3, 1, 2) * 2 - 1, batch=batch)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int) -> torch.Tensor:
        """Scaled latents -> frames [N, H, W, 3] in 0..1, float32 on the CPU (each block moved there at once)."""
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
            out = stylize_latents(self.denoiser(branches, 1.0), latents, sigmas, settings.seed,
                                  Chunking(None, noise="per_frame"), schedule=self.schedule, disable=False)
            images = self.decode(out, batch)
            seconds = time.perf_counter() - start
        return RunResult(images, plan, seconds, settings, entry)

    def run(self, frames: torch.Tensor, settings: StyleSettings, style_image=None, *, teacher_steps: int | None = None,
            chunking: Chunking = Chunking(None), progress_bar: bool = True) -> RunResult:
        """Stylize frames [N, H, W, 3] (an image is N = 1) with STD, or with the teacher when ``teacher_steps``.

        The teacher is the base model without the LoRA, run for ``teacher_steps`` DDIM steps from the same start
        timestep (:func:`comfyui_std.core.plan.teacher_plan`). Frames are sampled in the chunks of ``chunking``
        (default: all at once, shared noise) with the shared video path of the core.
        """
        settings = settings.validated()
        entry = self.catalog.get(settings.lora)
        plan = app_plan(settings.nfe, settings.start_strength, settings.plan)
        if teacher_steps is not None:
            plan = teacher_plan(plan.start_timestep, teacher_steps, plan.start_strength)
        batch = chunking.batch(frames.shape[0])
        with self._lock:
            start = time.perf_counter()
            self.use_lora(entry, settings.lora_scale)
            context = self.lora_disabled() if teacher_steps is not None else nullcontext()
            with context:
                branches = self.branches(settings, frames.shape[1], frames.shape[2], style_image)
                latents = self.encode(frames, batch)
                out = stylize_latents(self.denoiser(branches, settings.cfg), latents, self.sigmas(plan),
                                      settings.seed, chunking, gamma=settings.gamma, schedule=self.schedule,
                                      disable=not progress_bar)
                images = self.decode(out, batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return RunResult(images, plan, seconds, settings, None if teacher_steps is not None else entry)


    # Streamed video -----------------------------------------------------------------------------------------------
    @contextmanager
    def vae_tiling(self, enabled: bool):
        """Tiled VAE encode/decode (diffusers' ``enable_tiling``) inside the block, for frames larger than the VAE's
        tile; the previous setting is restored after."""
        vae = self.pipe.vae
        before = bool(getattr(vae, "use_tiling", False))
        vae.enable_tiling() if enabled else vae.disable_tiling()
        try:
            yield
        finally:
            vae.enable_tiling() if before else vae.disable_tiling()

    def run_video_file(self, source, output, settings: StyleSettings, style_image=None, *, size: int | None = None,
                       chunking: Chunking = Chunking(), frame_load_cap: int = 0,
                       skip_first_frames: int = 0, select_every_nth: int = 1, force_rate: float = 0.0,
                       max_frames: int = MAX_VIDEO_FRAMES, tiled_vae: bool = False, audio: bool = True,
                       fmt: str | None = None, record: dict | None = None, progress=None) -> VideoRunResult:
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
        """
        settings = settings.validated()
        if chunking.frames_per_batch is None:
            raise STDInputError("frames_per_batch", "a video file is stylized in chunks: set frames_per_batch")
        frames_per_batch = chunking.frames_per_batch
        max_frames = check_range("max_frames", max_frames, 1, MAX_VIDEO_FRAMES, kind=int)
        cap = check_range("frame_load_cap", frame_load_cap, 0, max_frames, kind=int) or max_frames
        if size is not None:
            size = check_range("size", size, self.vae_scale, 16384, kind=int)
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
                self.use_lora(entry, settings.lora_scale)
                with self.vae_tiling(tiled_vae):
                    branches = self.branches(settings, height, width, style_image)
                    run_chunk = std_chunk_runner(self.denoiser(branches, settings.cfg), self.sigmas(plan),
                                                 settings.seed, chunking.noise, gamma=settings.gamma,
                                                 schedule=self.schedule, disable=True)
                    report: StreamReport = stylize_video_file(
                        reader, output, seed=settings.seed, chunking=chunking, vae_batch=frames_per_batch, audio=audio, fmt=fmt, progress=progress,
                        encode=lambda f: self.encode(resize_frames(f, (width, height)), frames_per_batch),
                        run_chunk=run_chunk, decode=lambda z: self.decode(z, frames_per_batch),
                        metadata={"comment": json.dumps(rec, sort_keys=True)})
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
        return VideoRunResult.from_report(report, notices, plan=plan, seconds=seconds, settings=settings, lora=entry,
                                          record=rec)

