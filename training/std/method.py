"""The STD method: teacher = base + the artist's style, student = the same base with one trainable LoRA.

One micro-step (docs/official-std-code.md §2.4, with the official code's bugs fixed): each sample of a batch (one
aspect bucket) either continues a trajectory drawn from the bank (state, index and its own context restored; an
entry at most once per batch) or starts fresh at ``n0 = ceil(50 η)`` from its noised latent (:meth:`fresh_start`).
The teacher advances it one CFG'd DDIM grid step (:meth:`teacher_step`, LCM-form guidance with
``w ~ U[w_min, w_max]`` and a proper unconditional branch). The student's jump from ``(x_n, τ_n)`` to a level ``s``
of the target window (official or the paper's γ window) is matched (pseudo-Huber) to the stop-gradient target's jump
from the teacher's next state ``(x_{n-1}, τ_{n-1})`` to the same ``s``. The teacher is the base UNet with the
student adapter disabled (no second UNet in memory); style LoRAs are merged into it (UNet and text encoders) and
exported with the student by default, so the exported LoRA alone reproduces the student. Optionally the asymmetric
adversarial loss is added (real images noised to ``r < s``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError, check_range
from comfyui_std.core.plan import STDPlan, check_nfe, std_plan, teacher_plan
from comfyui_std.core.sampling import sample_std
from comfyui_std.core.schedules import KDenoiser
from comfyui_std.core.style_blocks import PRESET_NAMES
from comfyui_std.core.vp import add_noise, guidance, x0_eps
from std_hf.base import encode_prompts, load_base, time_ids, unet_kwargs
from std_hf.lora import lora_layers, merge_layers, read_lora
from training.common.config import CommonConfig, method_options, option, validate_common
from training.common.data import (BucketSampler, PixelPrefetcher, PixelSource, assign_buckets, cache_key,
                                  load_pixels, scan_folder)
from training.common.ema import ema_copy, ema_update, swapped
from training.common.export import combine, export_layers, export_lora
from training.common.adapters import adapter_layers, adapter_params, add_lora
from training.common.precision import cast_frozen, vae_dtype
from training.common.state import atomic_file
from training.std.offline_bank import OfflineTrajectories
from training.std.trajectory_bank import TrajectoryBank
from training.std.trajectory import (LAST_INDEX, S_WINDOWS, DDIMGrid, cfg_lcm, draw_target_index, jump,
                                     pseudo_huber, start_index, window_size)

log = logging.getLogger("training")
ADAPTER = "student"
EXPORTS = ("with_style", "delta")


@dataclasses.dataclass
class STDConfig(CommonConfig):
    data: str = option("", "Folder of training images and/or videos, with optional same-stem .txt captions (UTF-8).")
    make_demo_data: str = option("", "Write the project's small demo data set (12 captioned 96-px images) into this "
                                     "new folder and train on it (for a first tiny run without pictures of your "
                                     "own; --data is then that folder).")
    start_strength: float = option(0.75, "η: the student starts from the content noised to grid index ceil(50η) "
                                         "(0.75 -> t 779); load the LoRA with the same η at inference.")
    range_rate: float = option(0.5, "rr: with --s-window official the target level s lies within R = ceil(50·η·rr) "
                                    "grid steps below the current one (paper: 0.5 images, 0.3 video).")
    s_window: str = option("official", "Target-level window: official (fixed width R in grid steps, what the released "
                                       "LoRAs use; reaches s = 0 late in a trajectory) or paper (s >= γ·t, the "
                                       "paper's lower-bound ratio).", choices=S_WINDOWS)
    s_gamma: float = option(0.7, "γ of --s-window paper: s lies in [γ·t, t) (the paper's ablation: 0.7 best).")
    rho: float = option(0.8, "Probability of training on a trajectory-bank state instead of a fresh start.")
    bank_size: int = option(4, "Trajectories kept in the bank at once per aspect bucket (states stored fp16 on "
                                "disk); the official run keeps 4.")
    w_min: float = option(5.0, "Lower bound of the distilled guidance scale w (teacher CFG 1 + w, LCM form).")
    w_max: float = option(15.0, "Upper bound of w.")
    huber_c: float = option(1e-3, "Pseudo-Huber c of the distillation loss (on latents).")
    ema_target: bool = option(False, "Use an EMA of the student LoRA as the target θ⁻ (the paper's figure) instead "
                                     "of the stop-gradient online weights (what the official code runs).")
    ema_decay: float = option(0.95, "EMA decay of the target (ema_target).")
    style_lora: list = option([], "Style LoRA file(s) merged into the teacher, UNet and text-encoder layers "
                                  "(comma-separated; kohya, diffusers or PEFT files).")
    style_lora_scale: float = option(1.0, "Strength of the merged style LoRA(s).")
    export: str = option("with_style", "What the exported LoRA holds: with_style (base + style + STD delta as one LoRA "
                                       "of the summed rank: load it alone) or delta (the STD delta only; load the "
                                       "style LoRA too; its file is named in the metadata).", choices=EXPORTS,
                         free=True)
    style_prompt: str = option("", "Added to every caption (e.g. 'in the style of my watercolours').")
    style_image: str = option("", "Optional style reference image for the teacher, through an IP-Adapter on the "
                                  "style block (needs --ip-adapter and --image-encoder).")
    ip_adapter: str = option("", "Standard IP-Adapter .safetensors for --style-image (e.g. ip-adapter_sdxl_vit-h).")
    image_encoder: str = option("", "Its CLIP image encoder: a transformers folder or a ComfyUI clip_vision "
                                    ".safetensors file (ViT-H/14).")
    ip_preset: str = option("style", "Blocks that receive the style image.", choices=PRESET_NAMES)
    ip_weight: float = option(1.0, "Scale of the IP-Adapter in the teacher.")
    adversarial: bool = option(False, "Add the asymmetric adversarial loss (DINOv2 discriminator).")
    adv_weight: float = option(0.7, "λ_adv (paper: 0.7 images, 0.5 video).")
    disc_learning_rate: float = option(1e-4, "Learning rate of the discriminator heads.")
    dino: str = option("facebook/dinov2-small", "DINOv2 ViT-S/14: a local folder or Hub id ('tiny' = random).")
    dino_hooks: list = option([2, 5, 8, 11], "DINOv2 blocks whose tokens the discriminator heads read.")
    gp_weight: float = option(1e-5, "Weight of the gradient penalty on DINO features.")
    adaptive_gp: bool = option(False, "The official code's adaptive penalty: the gradient-penalty weight is multiplied "
                                      "by 5 whenever the penalty reaches 100, at most once every 500 discriminator "
                                      "steps (the weight then changes during the run; off: a fixed weight).")
    preview_nfe: list = option([4, 8], "Student NFEs shown in preview grids (next to the teacher).", free=True)
    preview_teacher_nfe: int = option(20, "Teacher steps in preview grids (grid levels from the start index; fewer "
                                          "is cheaper, at most ceil(50 η)).", free=True)
    video: bool = option(False, "Video mode: train on clips of num_frames frames with a motion module in teacher "
                                "and student (AnimateDiff); data must hold videos.")
    num_frames: int = option(8, "Frames per training clip (video mode).")
    frame_stride: int = option(4, "Source frames between clip frames (video mode; the paper: 4).")
    random_clip_offset: bool = option(True, "Video mode: each clip starts at a random frame (seeded) instead of the "
                                            "first.")
    motion_adapter: str = option("", "Motion module (video mode): a file as ComfyUI/models/animatediff_models holds "
                                     "them (AnimateDiff v2/v3 or AnimateDiff-SDXL .ckpt/.safetensors, Hotshot-XL "
                                     "hsxl_temporal_layers.safetensors), a diffusers MotionAdapter folder or Hub "
                                     "id, for the base's architecture ('tiny' = random).")
    bank_source: str = option("", "Train from trajectories precomputed by 'python -m training.bank build' (no "
                                  "teacher call per step) instead of the online bank.")
    num_workers: int = option(0, "DataLoader processes that decode and crop the coming batches while the GPU trains "
                                 "(0: in the training process). The result does not depend on it. Not used with "
                                 "--cache-latents or --bank-source (nothing to decode per step).", free=True)


PRESETS = {
    "tiny": {"_doc": "CPU smoke run on a tiny random model (under two minutes)", "base": "tiny", "resolution": 64,
             "max_steps": 6, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-4, "lr_warmup": 1,
             "checkpoint_every": 3, "bank_size": 4, "device": "cpu", "dino": "tiny", "dino_hooks": [0, 1],
             "preview_nfe": [2], "preview_teacher_nfe": 2, "num_previews": 1},
    "sd15-8gb": {"_doc": "SD1.5 at 512 on an 8 GB GPU (bf16 weights, checkpointing, 8-bit Adam, text encoders "
                         "offloaded)", "resolution": 512, "mixed_precision": "bf16", "gradient_checkpointing": True,
                 "use_8bit_adam": True, "offload_text_encoders": True, "lora_rank": 32, "lora_alpha": 32.0,
                 "num_workers": 2, "grad_accum": 8, "lr_warmup": 500, "max_steps": 2000},
    "sdxl-12gb": {"_doc": "SDXL at 512 on a 12 GB GPU (bf16 weights and VAE, checkpointing, 8-bit Adam, rank 32, "
                          "text encoders offloaded, no adversary)", "resolution": 512, "mixed_precision": "bf16",
                  "vae_dtype": "bf16", "gradient_checkpointing": True, "use_8bit_adam": True,
                  "offload_text_encoders": True, "lora_rank": 32, "lora_alpha": 32.0, "num_workers": 2,
                  "grad_accum": 8, "lr_warmup": 500, "max_steps": 2000},
    "tiny-video": {"_doc": "CPU smoke run of video mode (tiny random model and motion module)", "base": "tiny",
                   "resolution": 64, "max_steps": 4, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-4,
                   "lr_warmup": 1, "checkpoint_every": 2, "device": "cpu", "video": True, "num_frames": 3,
                   "frame_stride": 2, "motion_adapter": "tiny", "range_rate": 0.3, "adv_weight": 0.5,
                   "dino": "tiny", "dino_hooks": [0, 1], "preview_nfe": [2], "preview_teacher_nfe": 2,
                   "num_previews": 1},
    "sdxl-24gb": {"_doc": "SDXL at 512 on a 24 GB GPU, the paper's rank 64 and the adversarial loss",
                  "resolution": 512, "mixed_precision": "bf16", "gradient_checkpointing": True,
                  "offload_text_encoders": True, "lora_rank": 64, "lora_alpha": 64.0, "adversarial": True,
                  "num_workers": 2, "grad_accum": 8, "lr_warmup": 500, "max_steps": 3000},
}


def validate(cfg: STDConfig) -> None:
    validate_common(cfg)
    n0 = start_index(check_range("start_strength", cfg.start_strength, 0.0, 1.0, low_open=True))
    check_range("range_rate", cfg.range_rate, 0.0, 1.0, low_open=True)
    check_range("s_gamma", cfg.s_gamma, 0.0, 1.0, high_open=True)
    check_range("rho", cfg.rho, 0.0, 1.0)
    check_range("bank_size", cfg.bank_size, 1, 10**6, kind=int)
    check_range("w_min", cfg.w_min, 0.0, 50.0)
    check_range("w_max", cfg.w_max, cfg.w_min, 50.0)
    check_range("huber_c", cfg.huber_c, 0.0, 1.0, low_open=True)
    check_range("ema_decay", cfg.ema_decay, 0.0, 1.0, high_open=True)
    check_range("style_lora_scale", cfg.style_lora_scale, -10.0, 10.0)
    check_range("ip_weight", cfg.ip_weight, 0.0, 5.0)
    check_range("adv_weight", cfg.adv_weight, 0.0, 100.0)
    check_range("disc_learning_rate", cfg.disc_learning_rate, 0.0, 1.0, low_open=True)
    check_range("gp_weight", cfg.gp_weight, 0.0, 1e3)
    check_range("num_frames", cfg.num_frames, 1, 1024, kind=int)
    check_range("frame_stride", cfg.frame_stride, 1, 1024, kind=int)
    check_range("num_workers", cfg.num_workers, 0, 64, kind=int)
    check_range("preview_teacher_nfe", cfg.preview_teacher_nfe, 1, n0, kind=int)
    for h in cfg.dino_hooks:
        check_range("dino_hooks", h, 0, 1000, kind=int)
    if not cfg.preview_nfe:
        raise STDInputError("preview_nfe", "give at least one NFE (e.g. 4,8)")
    for nfe in cfg.preview_nfe:
        std_plan(check_nfe(nfe), cfg.start_strength, "trained_start")
    if not cfg.data and not cfg.make_demo_data:
        raise STDInputError("data", "give a folder of training images (--data), or --make-demo-data DIR for the "
                                    "project's demo images")
    if cfg.data and cfg.make_demo_data and Path(cfg.data).expanduser() != Path(cfg.make_demo_data).expanduser():
        raise STDInputError("make_demo_data", "trains on the demo folder it writes; leave out --data, or give the "
                                              "same folder")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class STDMethod:
    name = "std"

    def __init__(self, cfg: STDConfig, trainer):
        self.cfg = cfg
        self.trainer = trainer
        self.adv = None

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self):
        cfg, device = self.cfg, self.trainer.device
        validate(cfg)
        if cfg.make_demo_data:
            from training.std.demo_data import make_demo_data

            cfg.data = str(make_demo_data(cfg.make_demo_data))
            log.info("data: the demo images are in %s", cfg.data)
        span = (cfg.num_frames - 1) * cfg.frame_stride + 1 if cfg.video else 1
        items, skipped = scan_folder(cfg.data, cfg.style_prompt, videos=cfg.video, clip_span=span,
                                     exclude=(Path(cfg.output),))
        if skipped:
            log.warning("data: %d file(s) skipped, %d used", skipped, len(items))
        self.items, self.preview_items = self._split_previews(items, span)
        self.buckets = assign_buckets(self.items, cfg.resolution, cfg.aspect_buckets)
        log.info("data: %d item(s) in %d bucket(s) %s", len(self.items), len(set(self.buckets)),
                 ", ".join(f"{w}x{h}" for h, w in sorted(set(self.buckets))))
        self.sampler = BucketSampler(self.buckets, cfg.batch_size, cfg.seed, self.trainer.rank, self.trainer.world)
        self.pixels = PixelPrefetcher(PixelSource(tuple(self.items), self.sampler, cfg.seed, self.trainer.rank,
                                                  cfg.num_frames if cfg.video else 0, cfg.frame_stride,
                                                  cfg.random_clip_offset),
                                      0 if (cfg.cache_latents or cfg.bank_source) else cfg.num_workers,
                                      stop=cfg.max_steps * cfg.grad_accum)
        if cfg.num_workers and (cfg.cache_latents or cfg.bank_source):
            log.info("data: --num-workers %d not used: %s", cfg.num_workers, "latents come from the cache on disk"
                     if cfg.cache_latents else "states come from --bank-source")
        elif cfg.num_workers:
            log.info("data: %d worker process(es) decode and crop the coming batches", cfg.num_workers)
        self.vae_dtype = vae_dtype(cfg)
        # the frozen weights are read in the dtype they train in (under bf16 half the host RAM of fp32, see
        # training/README); a style LoRA is merged in fp32, so then everything is read in fp32 and cast after
        read = torch.float32 if cfg.style_lora else self.trainer.weight_dtype
        base = self.trainer.in_turn(lambda: load_base(cfg.base, read, cfg.tokenizer or None, seed=cfg.seed,
                                                      vae_dtype=self.vae_dtype))
        for r in base.reports:
            log.info("base %s: %s", base.name, r.line())
        if base.arch == "sdxl" and (cfg.mixed_precision == "no" or not cfg.gradient_checkpointing):
            log.warning("SDXL with --mixed-precision %s and gradient checkpointing %s: the frozen weights alone take "
                        "about %.1f GiB and the activations of a 512-px step several more; on a 12 or 24 GB GPU start "
                        "from --preset sdxl-12gb or --preset sdxl-24gb (bf16, checkpointing, 8-bit Adam)",
                        cfg.mixed_precision, "on" if cfg.gradient_checkpointing else "off",
                        (13.1 if cfg.mixed_precision == "no" else 6.6))
        self.style_layers = {}
        if cfg.style_lora:
            models = {"unet": base.unet, "text_encoder": base.text_encoders[0]}
            if len(base.text_encoders) > 1:
                models["text_encoder_2"] = base.text_encoders[1]
            for path in cfg.style_lora:
                sd, meta = read_lora(path, "style_lora")
                layers = lora_layers(base.unet, base.text_encoders, sd, meta, "style_lora", cfg.style_lora_scale,
                                     name=Path(path).name, base_label=base.name)
                merge_layers(models, layers)
                self.style_layers = combine(self.style_layers, layers)
                n_text = sum(1 for m, _ in layers if m != "unet")
                log.info("style LoRA %s merged into the teacher: %d UNet and %d text-encoder layers", path,
                         len(layers) - n_text, n_text)
        if cfg.video:
            from training.std.video import attach_motion_adapter
            base.unet = attach_motion_adapter(base.unet, cfg.motion_adapter, cfg.seed, base.arch, base.name)
        self.style_ref = None
        if cfg.style_image:
            if cfg.video:
                raise STDInputError("style_image", "the IP-Adapter style reference is for image mode only")
            if not (cfg.ip_adapter and cfg.image_encoder):
                raise STDInputError("style_image", "needs --ip-adapter and --image-encoder")
            from training.std.style_reference import StyleReference
            self.style_ref = StyleReference(base, cfg.ip_adapter, cfg.image_encoder, cfg.style_image,
                                            cfg.ip_preset, cfg.ip_weight)
        base.unet.requires_grad_(False)
        base.vae.requires_grad_(False)
        for t in base.text_encoders:
            t.requires_grad_(False)
        add_lora(base.unet, ADAPTER, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed,
                 exclude_motion_proj=cfg.video)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        cast_frozen(base, self.trainer.weight_dtype)
        base.to(device, vae_dtype=self.vae_dtype)
        self.base = base
        self.grid = DDIMGrid(base.schedule)
        self.n0 = start_index(cfg.start_strength)
        self.window = window_size(cfg.start_strength, cfg.range_rate)
        self.bank = TrajectoryBank(Path(cfg.output) / "bank" / f"rank{self.trainer.rank}", cfg.bank_size, cfg.rho,
                                   seed=cfg.seed * 7_919 + self.trainer.rank)
        if not cfg.resume:
            self.bank.clear_orphans()
        self.size = (cfg.resolution, cfg.resolution)
        self._uncond = None
        self.seen: list[int] = []  # data indices this rank trained on (written into checkpoints)
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.latent_dir = None
        if cfg.cache_latents:
            self.latent_dir = Path(cfg.latent_cache_dir or Path(cfg.output) / "latent_cache")
            self.latent_dir.mkdir(parents=True, exist_ok=True)
        self.ema = ema_copy(self._student_params()) if cfg.ema_target else None
        self.offline = None
        if cfg.bank_source:
            self.offline = OfflineTrajectories(cfg.bank_source)
            self.offline.check(method_options(cfg), [self.item_key(i) for i in range(len(self.items))])
        if cfg.adversarial:
            from training.std.adversarial import build_adversarial
            self.adv = build_adversarial(cfg.dino, cfg.dino_hooks, base.cond_dim, cfg.gp_weight,
                                         seed=cfg.seed + 1, adaptive_gp=cfg.adaptive_gp).to(device)
        if cfg.offload_text_encoders:
            self._cache_all_text()

    def _split_previews(self, items, span):
        """(training items, preview items): previews from --preview-images, else the last num_previews data items,
        held out of training when the folder has at least 4x as many."""
        cfg = self.cfg
        n = cfg.num_previews
        if n <= 0:
            return items, []
        if cfg.preview_images:
            previews, _ = scan_folder(cfg.preview_images, cfg.style_prompt, videos=cfg.video, clip_span=span)
            return items, previews[:n]
        if len(items) >= 4 * n:
            log.info("previews: %s held out of training", ", ".join(i.path.name for i in items[-n:]))
            return items[:-n], items[-n:]
        log.info("previews show training images (%d item(s); hold-out needs %d or --preview-images)", len(items),
                 4 * n)
        return items, items[-n:]

    def item_key(self, index: int) -> str:
        """A training item's name relative to the data folder (stable across machines; the offline bank's key)."""
        return self.items[index].path.relative_to(Path(self.cfg.data).expanduser()).as_posix()

    def _cache_all_text(self):
        captions = {it.caption for it in self.items + self.preview_items}
        for c in sorted(captions):
            self.text_context(c)
        self.uncond(1)
        for t in self.base.text_encoders:
            t.to("cpu")
        log.info("text encoders offloaded to the CPU after caching %d caption(s)", len(captions))

    def param_groups(self) -> dict:
        student = [p for _, p in self._student_params()]
        groups = {"student": (student, self.cfg.learning_rate, self.cfg.max_grad_norm)}
        if self.adv is not None:
            groups["discriminator"] = (list(self.adv.trainable_parameters()), self.cfg.disc_learning_rate, 0.0)
        return groups

    # -- state -----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{n}": p for n, p in self._student_params()}
        if self.ema is not None:
            out.update({f"ema.{n}": v for n, v in self.ema.items()})
        if self.adv is not None:
            out.update({f"adv.{k}": v for k, v in self.adv.state_dict().items()})
        return out

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self._student_params())
        want = {f"unet.{n}" for n in params} | ({f"ema.{n}" for n in self.ema} if self.ema is not None else set())
        got = {k for k in sd if not k.startswith("adv.")}
        if want != got:
            extra, missing = sorted(got - want), sorted(want - got)
            raise STDInputError("resume", f"the checkpoint's trainable tensors do not match this run "
                                          f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} extra, e.g. "
                                          f"{extra[:1]})")
        for k, v in sd.items():
            if k.startswith("unet."):
                params[k[5:]].data.copy_(v.to(params[k[5:]].device))
            elif k.startswith("ema."):
                self.ema[k[4:]].copy_(v)
        if self.adv is not None:
            self.adv.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("adv.")})

    def save_state(self, folder: Path, rank: int) -> None:
        self.bank.save_to(folder / "bank" / f"rank{rank}")
        (folder / f"data-rank{rank}.json").write_text(json.dumps({"items": [str(self.items[i].path.name)
                                                                              for i in self.seen[-10_000:]]}))

    def load_state(self, folder: Path, rank: int) -> None:
        src = folder / "bank" / f"rank{rank}"
        if not (src / "bank.json").exists():
            raise STDInputError("resume", f"{folder} has no trajectory bank for rank {rank}")
        self.bank.load_from(src)
        self.bank.clear_orphans()

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            ema_update(self.ema, self._student_params(), self.cfg.ema_decay)

    def _student_params(self):
        return adapter_params(self.base.unet, ADAPTER)

    def target(self):
        """The target network θ⁻: the online weights (stop-gradient), or their EMA when ema_target is on."""
        return swapped(self._student_params(), self.ema)

    # -- model calls -----------------------------------------------------------------------------------------
    @contextmanager
    def teacher(self):
        """The base model with the student adapter off: the frozen teacher."""
        self.base.unet.disable_adapters()
        if self.style_ref is not None:
            self.style_ref.set_scales(True)
        try:
            yield
        finally:
            self.base.unet.enable_adapters()
            if self.style_ref is not None:
                self.style_ref.set_scales(False)

    def unet(self, x, index, ctx, uncond: bool = False):
        return self.unet_at(x, self.grid.timestep(index), ctx, uncond)

    def unet_at(self, x, t, ctx, uncond: bool = False):
        kw = unet_kwargs(self.base, ctx)
        if self.style_ref is not None:  # zero-scaled outside the teacher; a zero image for the uncond branch
            kw["added_cond_kwargs"] = {**kw.get("added_cond_kwargs", {}), **self.style_ref.added_cond(
                x.shape[0], uncond, x.device, self.base.unet.dtype)}
        if x.ndim == 5:  # [B, C, F, H, W]: the motion UNet attends to the text once per frame
            kw["encoder_hidden_states"] = kw["encoder_hidden_states"].repeat_interleave(x.shape[2], dim=0)
        return self.base.unet(x.to(self.base.unet.dtype), t, **kw).sample.float()

    def uncond(self, n: int, like: dict | None = None) -> dict[str, torch.Tensor]:
        """The unconditional branch: empty prompt (SDXL: zeroed embeddings, as it was trained), the batch's
        size conditioning."""
        if self._uncond is None:
            c = self.text_context("")
            if self.base.arch == "sdxl":  # force_zeros_for_empty_prompt
                c = {k: torch.zeros_like(v) for k, v in c.items()}
            self._uncond = c
        out = {k: v.expand(n, *v.shape) for k, v in self._uncond.items()}
        if self.base.arch == "sdxl":
            out["time_ids"] = like["time_ids"] if like is not None else time_ids(self.size, self.size, (0, 0), n).to(
                self.trainer.device)
        return out

    def text_context(self, caption: str) -> dict[str, torch.Tensor]:
        """Text embeddings of one caption (prompt_embeds, pooled), computed once per caption."""
        hit = self._text_cache.get(caption)
        if hit is None:
            enc = encode_prompts(self.base, [caption], self.size)
            hit = {k: enc[k][0].to(self.trainer.device) for k in ("prompt_embeds", "pooled")}
            if len(self._text_cache) < 100_000:
                self._text_cache[caption] = hit
        return hit

    def sample_context(self, caption: str, crop, bucket) -> dict[str, torch.Tensor]:
        ctx = dict(self.text_context(caption))
        if self.base.arch == "sdxl":
            ctx["time_ids"] = time_ids(crop.original, tuple(bucket), (crop.top, crop.left))[0].to(self.trainer.device)
        return ctx

    @torch.no_grad()
    def encode_latent(self, index: int, gen: torch.Generator | None, bucket, items=None, pixels=None):
        """(z0, crop) of one item: a posterior sample of a seeded random crop/flip/clip (``pixels``: that
        (pixels, crop), already loaded), or from the disk cache (center crop and clip start fixed, flip and
        posterior sample still drawn)."""
        from training.common.data import Crop

        item = (items or self.items)[index]
        cfg = self.cfg
        frames = cfg.num_frames if cfg.video else 0
        cached = self.latent_dir is not None and items is None
        if cached:
            dtype = str(self.vae_dtype).replace("torch.", "")  # the dtype the VAE really runs in
            key = cache_key(item, bucket, f"{self.base.source}|{dtype}|{frames}|{cfg.frame_stride}")
            path = self.latent_dir / f"{key}.safetensors"
            if not path.exists():
                with self.trainer.phase("vae"):
                    self._write_latent(item, bucket, frames, path)
            from safetensors.torch import load_file
            with self.trainer.phase("data"):
                t = load_file(str(path))
            flip = gen is not None and bool(torch.rand((), generator=gen) < 0.5)
            mean = t["mean_flip" if flip else "mean"].to(self.trainer.device)
            std = t.get("std_flip" if flip else "std")
            z0 = mean if (std is None or gen is None) else mean + std.to(mean) * torch.randn(
                mean.shape, generator=gen).to(mean)
            crop = Crop((int(t["original"][0]), int(t["original"][1])), int(t["crop"][0]), int(t["crop"][1]), flip)
            return z0.float(), crop
        if pixels is None:
            with self.trainer.phase("data"):
                pixels = load_pixels(item, bucket, gen, num_frames=frames, frame_stride=cfg.frame_stride,
                                     flip=gen is not None, random_offset=cfg.random_clip_offset)
        with self.trainer.phase("vae"):
            return self._encode(pixels[0], gen), pixels[1]

    def _encode(self, pixels: torch.Tensor, gen) -> torch.Tensor:
        if pixels.ndim == 4:  # [F,3,S,S] -> latents [4,F,h,w]: one noise level for the whole clip
            return self.base.encode_latents(pixels.to(self.trainer.device, self.vae_dtype), gen).movedim(0, 1).float()
        return self.base.encode_latents(pixels[None].to(self.trainer.device, self.vae_dtype), gen)[0].float()

    def _write_latent(self, item, bucket, frames, path: Path) -> None:
        from safetensors.torch import save_file

        pixels, crop = load_pixels(item, bucket, None, num_frames=frames, frame_stride=self.cfg.frame_stride,
                                   flip=False, random_offset=False)
        out = {"original": torch.tensor(crop.original), "crop": torch.tensor([crop.top, crop.left])}
        for tag, px in (("", pixels), ("_flip", pixels.flip(-1))):
            x = px[None] if px.ndim == 3 else px
            mean, std = self.base.latent_moments(x.to(self.trainer.device, self.vae_dtype))
            if px.ndim == 4:
                mean, std = mean.movedim(0, 1), (std.movedim(0, 1) if std is not None else None)
            else:
                mean, std = mean[0], (std[0] if std is not None else None)
            out["mean" + tag] = mean.float().cpu().contiguous()
            if std is not None:
                out["std" + tag] = std.float().cpu().contiguous()
        with atomic_file(path) as tmp:
            save_file(out, str(tmp))

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents -> pixels; clips [B,C,F,h,w] decode the given frames (the discriminator is per frame)."""
        if latents.ndim == 5:
            picked = latents[:, :, frames] if frames is not None else latents
            flat = picked.movedim(2, 1).reshape(-1, *picked.shape[1:2], *picked.shape[3:])
            return self.base.decode_latents(flat)
        return self.base.decode_latents(latents)

    # -- the two building blocks (also used by the offline bank builder) -------------------------------------
    def fresh_start(self, item_index: int, gen: torch.Generator, bucket, pixels=None) -> dict:
        """A new trajectory: the item's latent noised to τ_{n0}, its own context and a guidance scale w
        (``pixels``: the item's (pixels, crop) when already loaded)."""
        device = self.trainer.device
        item = self.items[item_index]
        z0, crop = self.encode_latent(item_index, gen, bucket, pixels=pixels)
        with self.trainer.phase("text"):
            ctx = self.sample_context(item.caption, crop, bucket)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        x = add_noise(z0[None], noise[None], self.grid.alpha(torch.tensor([self.n0])).to(device))[0]
        w = float(self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand((), generator=gen))
        return dict(entry=None, x=x, n=self.n0, z0=z0, ctx=ctx, w=w, caption=item.caption)

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, n: torch.Tensor, ctx: dict, w: torch.Tensor) -> torch.Tensor:
        """One CFG'd (LCM form, scale 1 + w) DDIM grid step τ_n -> τ_{n-1} of the frozen teacher."""
        pt = self.base.prediction_type
        with self.teacher():
            cond = x0_eps(self.unet(x, n, ctx), x, self.grid.alpha(n), pt)
            unc = x0_eps(self.unet(x, n, self.uncond(len(x), ctx), uncond=True), x, self.grid.alpha(n), pt)
        x0_t, eps_t = cfg_lcm(cond, unc, w)
        return jump(x0_t, eps_t, self.grid.alpha_prev(n))

    # -- one micro-step --------------------------------------------------------------------------------------
    def _gather(self, micro_step: int, gen: torch.Generator):
        """Per sample of the batch (one bucket): a bank entry (with its own context) or a fresh start at n0."""
        device = self.trainer.device
        bucket, indices = self.sampler.batch(micro_step)
        self.seen.extend(indices)
        if self.offline is not None:
            return [self._offline_row(i, gen) for i in indices], bucket
        rows = []
        for position, (item_index, entry) in enumerate(zip(indices, self.bank.draw_batch(len(indices), bucket))):
            if entry is not None:
                with self.trainer.phase("bank"):
                    t = entry.tensors(self.bank.root, device=device)
                ctx = {k: t[k] for k in t if k not in ("state", "z0")}
                rows.append(dict(entry=entry, x=t["state"], n=entry.index, z0=t["z0"], ctx=ctx, w=entry.w,
                                 caption=entry.caption))
            else:
                with self.trainer.phase("data"):
                    pixels = None if self.latent_dir is not None else self.pixels.sample(micro_step, position)
                rows.append(self.fresh_start(item_index, gen, bucket, pixels))
        return rows, bucket

    def _offline_row(self, item_index: int, gen: torch.Generator) -> dict:
        """A precomputed (x_n, x_{n-1}) pair of one of the item's trajectories: the start index with probability
        1 - ρ, else uniform below it (the online bank's stationary distribution, roughly)."""
        key = self.item_key(item_index)
        draw = int(torch.randint(self.offline.draws(key), (), generator=gen))
        if torch.rand((), generator=gen) >= self.cfg.rho or self.n0 <= LAST_INDEX + 1:
            n = self.n0
        else:
            n = int(torch.randint(LAST_INDEX + 1, self.n0, (), generator=gen))
        p = self.offline.pair(key, draw, n, self.trainer.device)
        if p["start_index"] != self.n0:
            raise STDInputError("bank_source", f"trajectories start at grid index {p['start_index']}, this run at "
                                               f"{self.n0} (another start_strength)")
        return dict(entry=None, x=p["x"], x_prev=p["x_prev"], n=n, z0=p["z0"], ctx=p["ctx"], w=p["w"],
                    caption=p["caption"])

    def micro_step(self, micro_step: int):
        cfg, device = self.cfg, self.trainer.device
        gen = self.trainer.generator(micro_step)
        rows, bucket = self._gather(micro_step, gen)
        x = torch.stack([r["x"] for r in rows]).float()
        n = torch.tensor([r["n"] for r in rows], device=device)
        ctx = {k: torch.stack([r["ctx"][k] for r in rows]) for k in rows[0]["ctx"]}
        w = torch.tensor([r["w"] for r in rows], device=device)
        pt = self.base.prediction_type
        j = draw_target_index(n, self.window, gen, cfg.s_window, cfg.s_gamma, self.grid)  # target level s = τ_{j-1}
        a_s = self.grid.alpha_prev(j)
        with torch.no_grad():
            if "x_prev" in rows[0]:  # precomputed trajectory: the teacher's next state is on disk
                x_prev = torch.stack([r["x_prev"] for r in rows]).float()
            else:
                with self.trainer.phase("teacher"):
                    x_prev = self.teacher_step(x, n, ctx, w)
                with self.trainer.phase("bank"):
                    for i, r in enumerate(rows):  # advance / retire / keep: the context travels with the state
                        self.bank.step(r["entry"], r["n"] - 1, x_prev[i], {"z0": r["z0"], **r["ctx"]}
                                       if r["entry"] is None else None, r["caption"], r["w"], last_index=LAST_INDEX,
                                       meta={"group": bucket})
            # stop-gradient target from the teacher's next state, jumping to the same s
            with self.trainer.phase("target"), self.target():
                x0_tg, eps_tg = x0_eps(self.unet(x_prev, n - 1, ctx), x_prev, self.grid.alpha(n - 1), pt)
            target = jump(x0_tg, eps_tg, a_s)
        # student jump (with grad) from (x_n, τ_n) to the same s; after the target, so that swapping in EMA
        # weights for the target never touches a tensor the backward pass needs
        with self.trainer.phase("student"):
            x0_s, eps_s = x0_eps(self.unet(x, n, ctx), x, self.grid.alpha(n), pt)
            student = jump(x0_s, eps_s, a_s)
            loss = pseudo_huber(student, target, cfg.huber_c)
        logs = {"train/index_mean": n.float().mean().item(), "train/bank_size": len(self.bank)}
        if self.adv is None:
            yield "student", loss, logs
            return
        frames = None
        pooled = ctx["pooled"]
        if student.ndim == 5:  # two random frames per clip (temporal segments), as the paper's discriminator sees
            f = student.shape[2]
            half = max(1, f // 2)
            frames = sorted({int(torch.randint(half, (), generator=gen)),
                             half + int(torch.randint(max(1, f - half), (), generator=gen)) if f > 1 else 0})
            pooled = pooled.repeat_interleave(len(frames), dim=0)
        with self.trainer.phase("vae"):
            fake = self.decode(student, frames)
        with self.trainer.phase("discriminator"):
            g_adv = self.adv.generator_loss(fake, pooled, gen)
        logs["loss/std"] = loss.item()
        yield "student", loss + cfg.adv_weight * g_adv, logs
        # second half: runs after the trainer's backward of the student loss (see training.common.method)
        with torch.no_grad():  # real images noised to r < s (asymmetric), decoded
            s_t = torch.where(j > 0, self.grid.timesteps.to(device)[(j - 1).clamp(min=0)], torch.zeros_like(j))
            r = torch.tensor([self.adv.asymmetric_real_level(int(s), gen) for s in s_t], device=device)
            z0 = torch.stack([row["z0"] for row in rows]).float()
            a_r = self.base.schedule.alphas_cumprod.to(device)[r]
            noised = add_noise(z0, torch.randn(z0.shape, generator=gen).to(device), a_r)
            with self.trainer.phase("vae"):
                real = self.decode(noised, frames)
        with self.trainer.phase("discriminator"):
            d_loss, d_logs = self.adv.discriminator_loss(real, fake.detach(), pooled, gen)
        yield "discriminator", d_loss, d_logs

    def close(self) -> None:
        pixels = getattr(self, "pixels", None)
        if pixels is not None:
            pixels.close()

    # -- previews and export ---------------------------------------------------------------------------------
    def preview_plan(self, nfe: int | None) -> STDPlan:
        """The timesteps a preview column visits: the student's ``trained_start`` plan at ``nfe``, or (``None``) the
        teacher's ``preview_teacher_nfe`` DDIM steps from the same start, the plan the app's Compare tab runs."""
        student = std_plan(nfe or 1, self.cfg.start_strength, "trained_start")
        if nfe is not None:
            return student
        return teacher_plan(student.start_timestep, self.cfg.preview_teacher_nfe, self.cfg.start_strength)

    @torch.no_grad()
    def _sample(self, z0, ctx, nfe: int | None, w: float, gen_seed: int) -> torch.Tensor:
        schedule = self.base.schedule
        uncond = self.uncond(z0.shape[0], ctx)

        def eps_fn(x_vp, t):
            t = torch.as_tensor(t).reshape(-1).to(x_vp.device).expand(x_vp.shape[0])
            out = self.unet_at(x_vp, t, ctx)
            if nfe is None:  # teacher: CFG (Imagen scale 1 + w)
                out_u = self.unet_at(x_vp, t, uncond, uncond=True)
                out = guidance(out_u, out, 1 + w)
            return out

        sigmas = self.preview_plan(nfe).sigmas(schedule).to(z0.device)
        g = torch.Generator().manual_seed(gen_seed)
        x = z0 + sigmas[0] * torch.randn(z0.shape, generator=g).to(z0.device)
        denoiser = KDenoiser(eps_fn, schedule)
        return sample_std(denoiser, x, sigmas, disable=True, gamma=0.0, schedule=schedule)

    @torch.no_grad()
    def preview(self):
        """input | teacher | student at each preview NFE, one row per preview image (square center crops)."""
        from PIL import Image

        cfg = self.cfg
        if not self.preview_items:
            return None
        rows = []
        for k, item in enumerate(self.preview_items):
            z0, crop = self.encode_latent(k, None, self.size, items=self.preview_items)
            frames = cfg.num_frames if cfg.video else 0
            pixels, _ = load_pixels(item, self.size, None, num_frames=frames, frame_stride=cfg.frame_stride,
                                    flip=False, random_offset=False)
            z0 = z0[None]
            pixels = torch.cat([pixels[:1], pixels[-1:]], dim=-1) if frames else pixels[None]
            ctx = {k2: v[None] for k2, v in self.sample_context(item.caption, crop, self.size).items()}
            w = (cfg.w_min + cfg.w_max) / 2

            def show(latents):
                if latents.ndim == 5:
                    first_last = self.decode(latents, [0, latents.shape[2] - 1])
                    return torch.cat([first_last[:1], first_last[1:]], dim=-1)
                return self.decode(latents)
            with self.teacher():
                cols = [pixels.float().to(self.trainer.device), show(self._sample(z0, ctx, None, w, k))]
            cols += [show(self._sample(z0, ctx, nfe, w, k)) for nfe in cfg.preview_nfe]
            rows.append(torch.cat(cols, dim=-1))
        grid = torch.cat(rows, dim=-2)[0].clamp(-1, 1)
        arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def export_name(self) -> str:
        return self.cfg.name or f"std_{self.base.arch}_{Path(self.base.name).stem}_eta{self.cfg.start_strength:g}"

    def export(self, folder: Path, suffix: str = "") -> list[Path]:
        cfg = self.cfg
        values = {"method": "std", "start_strength": cfg.start_strength, "start_index": self.n0,
                  "nfe": max(cfg.preview_nfe), "gamma": 0.0, "base_model": self.base.name,
                  "resolution": cfg.resolution, "rr": cfg.range_rate, "s_window": cfg.s_window,
                  "steps": self.trainer.step, "kind": "v2v" if cfg.video else "i2i"}
        if cfg.s_window == "paper":
            values["s_gamma"] = cfg.s_gamma
        if cfg.style_lora:
            values["style_loras"] = [{"file": Path(p).name, "sha256": file_digest(p), "scale": cfg.style_lora_scale}
                                     for p in cfg.style_lora]
        name = self.export_name() + suffix
        if cfg.style_lora and cfg.export == "with_style":
            values["contains"] = "base + style + STD delta"
            layers = combine(self.style_layers, adapter_layers(self.base.unet, ADAPTER))
            return export_layers(layers, Path(folder), name, values, self.base.arch)
        values["contains"] = "STD delta" + (" (load the style LoRA(s) named in std.style_loras too)"
                                            if cfg.style_lora else "")
        return export_lora(self.base.unet, ADAPTER, Path(folder), name, cfg.lora_rank, cfg.lora_alpha, values,
                           self.base.arch)
