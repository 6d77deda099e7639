"""The STD method: teacher = base + the artist's style, student = the same base with one trainable LoRA.

One micro-step (std.md §2.4 / §9, bugs fixed): each sample either continues a trajectory drawn from the bank
(state, index and its own context restored) or starts fresh at ``n0 = ceil(50 η)`` from its noised latent. The
student's jump from ``(x_n, τ_n)`` to a level ``s`` from the γ-window is matched (pseudo-Huber) to the stop-gradient
target's jump from the teacher's next state ``(x_{n-1}, τ_{n-1})`` to the same ``s``. The teacher is the base UNet
with the student adapter disabled (no second UNet in memory) and CFG-distilled with ``w ~ U[w_min, w_max]`` in LCM
form, with a proper unconditional branch. Optionally the asymmetric adversarial loss is added (real images noised to
``r < s``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError, check_range
from comfyui_std.core.plan import std_plan
from comfyui_std.core.sampling import sample_std
from comfyui_std.core.schedules import KDenoiser
from training.common.config import CommonConfig, option
from training.common.ema import ema_copy, ema_update, swapped
from training.common.data import StepSampler, load_pixels, scan_folder
from training.common.export import export_lora
from training.common.models import attach_motion_adapter, encode_prompts, load_base, merge_lora, unet_kwargs
from training.std.bank import TrajectoryBank
from training.std.trajectory import (LAST_INDEX, DDIMGrid, add_noise, cfg_lcm, draw_target_index, jump,
                                     pseudo_huber, start_index, window_size, x0_eps)

log = logging.getLogger("training")
ADAPTER = "student"


@dataclasses.dataclass
class STDConfig(CommonConfig):
    data: str = option("", "Folder of training images and/or videos, with optional same-stem .txt captions.")
    start_strength: float = option(0.75, "η: the student starts from the content noised to grid index ceil(50η) "
                                         "(0.75 -> t 779); load the LoRA with the same η at inference.")
    range_rate: float = option(0.5, "rr: the target level s lies within R = ceil(50·η·rr) grid steps below the "
                                    "current one (paper: 0.5 images, 0.3 video).")
    rho: float = option(0.8, "Probability of training on a trajectory-bank state instead of a fresh start.")
    bank_size: int = option(4, "Trajectories kept in the bank at once (states stored fp16 on disk).")
    w_min: float = option(5.0, "Lower bound of the distilled guidance scale w (teacher CFG 1 + w, LCM form).")
    w_max: float = option(15.0, "Upper bound of w.")
    huber_c: float = option(1e-3, "Pseudo-Huber c of the distillation loss (on latents).")
    ema_target: bool = option(False, "Use an EMA of the student LoRA as the target θ⁻ (the paper's figure) instead "
                                     "of the stop-gradient online weights (what the official code runs).")
    ema_decay: float = option(0.95, "EMA decay of the target (ema_target).")
    style_lora: list = option([], "Style LoRA file(s) merged into the teacher (comma-separated).")
    style_lora_scale: float = option(1.0, "Strength of the merged style LoRA(s).")
    style_prompt: str = option("", "Added to every caption (e.g. 'in the style of my watercolours').")
    style_image: str = option("", "Optional style reference image for the teacher, through an IP-Adapter on the "
                                  "style block (needs --ip-adapter and --image-encoder).")
    ip_adapter: str = option("", "Standard IP-Adapter .safetensors for --style-image (e.g. ip-adapter_sdxl_vit-h).")
    image_encoder: str = option("", "CLIPVisionModelWithProjection folder for the IP-Adapter (ViT-H/14).")
    ip_preset: str = option("style", "Blocks that receive the style image: style, layout, style+layout, all blocks.")
    ip_weight: float = option(1.0, "Scale of the IP-Adapter in the teacher.")
    adversarial: bool = option(False, "Add the asymmetric adversarial loss (DINOv2 discriminator).")
    adv_weight: float = option(0.7, "λ_adv (paper: 0.7 images, 0.5 video).")
    disc_learning_rate: float = option(1e-4, "Learning rate of the discriminator heads.")
    dino: str = option("facebook/dinov2-small", "DINOv2 ViT-S/14: a local folder or Hub id ('tiny' = random).")
    dino_hooks: list = option([2, 5, 8, 11], "DINOv2 blocks whose tokens the discriminator heads read.")
    gp_weight: float = option(1e-5, "Weight of the gradient penalty on DINO features.")
    preview_nfe: list = option([4, 8], "Student NFEs shown in preview grids (next to the teacher).")
    video: bool = option(False, "Video mode: train on clips of num_frames frames with a motion module in teacher "
                                "and student (AnimateDiff); data must hold videos.")
    num_frames: int = option(8, "Frames per training clip (video mode).")
    frame_stride: int = option(4, "Source frames between clip frames (video mode; the paper: 4).")
    motion_adapter: str = option("", "diffusers MotionAdapter folder or Hub id (video mode): an SD1.5 AnimateDiff "
                                     "adapter or an SDXL one ('tiny' = random).")
    bank_source: str = option("", "Train from trajectories precomputed by 'python -m training.bank build' (no "
                                  "teacher call per step) instead of the online bank.")


PRESETS = {
    "tiny": {"_doc": "CPU smoke run on a tiny random model (under two minutes)", "base": "tiny", "resolution": 64,
             "max_steps": 6, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-4, "lr_warmup": 1,
             "checkpoint_every": 3, "bank_size": 4, "device": "cpu", "dino": "tiny", "dino_hooks": [0, 1],
             "preview_nfe": [2], "num_previews": 1},
    "sd15-8gb": {"_doc": "SD1.5 at 512 on an 8 GB GPU (bf16, checkpointing, 8-bit Adam, cached text)",
                 "resolution": 512, "mixed_precision": "bf16", "gradient_checkpointing": True,
                 "use_8bit_adam": True, "lora_rank": 32, "lora_alpha": 32.0, "max_steps": 2000},
    "sdxl-12gb": {"_doc": "SDXL at 512 on a 12 GB GPU (bf16, checkpointing, 8-bit Adam, rank 32, no adversary)",
                  "resolution": 512, "mixed_precision": "bf16", "gradient_checkpointing": True,
                  "use_8bit_adam": True, "lora_rank": 32, "lora_alpha": 32.0, "max_steps": 2000},
    "tiny-video": {"_doc": "CPU smoke run of video mode (tiny random model and motion module)", "base": "tiny",
                   "resolution": 64, "max_steps": 4, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-4,
                   "lr_warmup": 1, "checkpoint_every": 2, "device": "cpu", "video": True, "num_frames": 3,
                   "frame_stride": 2, "motion_adapter": "tiny", "range_rate": 0.3, "adv_weight": 0.5,
                   "dino": "tiny", "dino_hooks": [0, 1], "preview_nfe": [2], "num_previews": 1},
    "sdxl-24gb": {"_doc": "SDXL at 512 on a 24 GB GPU, the paper's rank 64 and the adversarial loss",
                  "resolution": 512, "mixed_precision": "bf16", "gradient_checkpointing": True,
                  "lora_rank": 64, "lora_alpha": 64.0, "adversarial": True, "max_steps": 3000},
}


def validate(cfg: STDConfig) -> None:
    start_index(check_range("start_strength", cfg.start_strength, 0.0, 1.0, low_open=True))
    check_range("range_rate", cfg.range_rate, 0.0, 1.0, low_open=True)
    check_range("rho", cfg.rho, 0.0, 1.0)
    check_range("w_min", cfg.w_min, 0.0, 50.0)
    check_range("w_max", cfg.w_max, cfg.w_min, 50.0)
    check_range("huber_c", cfg.huber_c, 0.0, 1.0, low_open=True)
    check_range("resolution", cfg.resolution, 8, 4096, kind=int)
    if cfg.resolution % 8:
        raise STDInputError("resolution", f"got {cfg.resolution}, must be a multiple of 8")
    check_range("max_steps", cfg.max_steps, 1, 10**9, kind=int)
    check_range("batch_size", cfg.batch_size, 1, 4096, kind=int)
    check_range("grad_accum", cfg.grad_accum, 1, 4096, kind=int)
    check_range("lora_rank", cfg.lora_rank, 1, 4096, kind=int)
    check_range("learning_rate", cfg.learning_rate, 0.0, 1.0, low_open=True)
    if not cfg.base:
        raise STDInputError("base", "give a base model (--base: diffusers folder, .safetensors, Hub id or 'tiny')")
    if not cfg.data:
        raise STDInputError("data", "give a folder of training images (--data)")


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
        self.items, skipped = scan_folder(cfg.data, cfg.style_prompt, videos=cfg.video)
        if skipped:
            log.warning("data: %d unreadable file(s) skipped, %d used", skipped, len(self.items))
        self.sampler = StepSampler(len(self.items), cfg.batch_size, cfg.seed, self.trainer.rank, self.trainer.world)
        base = load_base(cfg.base, cfg.tokenizer or None, cfg.seed)
        for path in cfg.style_lora:
            n = merge_lora(base.unet, path, cfg.style_lora_scale)
            log.info("style LoRA %s merged into the teacher (%d layers)", path, n)
        if cfg.video:
            base.unet = attach_motion_adapter(base.unet, cfg.motion_adapter)
        self.style_ref = None
        if cfg.style_image:
            if cfg.video:
                raise STDInputError("style_image", "the IP-Adapter style reference is for image mode only")
            if not (cfg.ip_adapter and cfg.image_encoder):
                raise STDInputError("style_image", "needs --ip-adapter and --image-encoder")
            from training.common.models import StyleReference
            self.style_ref = StyleReference(base, cfg.ip_adapter, cfg.image_encoder, cfg.style_image,
                                            cfg.ip_preset, cfg.ip_weight)
        from peft import LoraConfig

        base.unet.requires_grad_(False)
        base.vae.requires_grad_(False)
        for t in base.text_encoders:
            t.requires_grad_(False)
        targets = "|".join(t.replace(".", r"\.") for t in cfg.lora_targets)
        # diffusers' motion transformers call proj_in/proj_out with a keyword argument that PEFT's LoRA layers do
        # not accept, so those two projections inside motion modules stay without LoRA
        base.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                         target_modules=rf"^(?!.*motion_modules.*\.proj_(?:in|out)$).*\.({targets})$"),
                              adapter_name=ADAPTER)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        vae_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.vae_dtype]
        base.to(device, vae_dtype=vae_dtype)
        self.base = base
        self.vae_dtype = vae_dtype
        self.grid = DDIMGrid(base.schedule)
        self.n0 = start_index(cfg.start_strength)
        self.window = window_size(cfg.start_strength, cfg.range_rate)
        self.bank = TrajectoryBank(Path(cfg.output) / "bank" / f"rank{self.trainer.rank}", cfg.bank_size, cfg.rho,
                                   seed=cfg.seed * 7_919 + self.trainer.rank)
        self.bank.clear_orphans() if not cfg.resume else None
        self.size = (cfg.resolution, cfg.resolution)
        self._uncond = None
        self.seen: list[int] = []  # data indices this rank trained on (written into checkpoints)
        self._latent_cache: dict[int, torch.Tensor] = {}
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.ema = ema_copy(self._student_params()) if cfg.ema_target else None
        self.offline = None
        if cfg.bank_source:
            from training.bank import OfflineTrajectories
            self.offline = OfflineTrajectories(cfg.bank_source)
        if cfg.adversarial:
            from training.std.adversarial import build_adversarial
            self.adv = build_adversarial(cfg.dino, cfg.dino_hooks, base.cond_dim, cfg.gp_weight).to(device)

    def param_groups(self) -> dict:
        student = [p for _, p in self._student_params()]
        if not student:
            raise RuntimeError("no trainable LoRA parameters: check lora_targets")
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
        params = dict(self.base.unet.named_parameters())
        for k, v in sd.items():
            if k.startswith("unet."):
                params[k[5:]].data.copy_(v.to(params[k[5:]].device))
            elif k.startswith("ema.") and self.ema is not None:
                self.ema[k[4:]].copy_(v)
        if self.adv is not None:
            self.adv.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("adv.")})

    def save_state(self, folder: Path, rank: int) -> None:
        self.bank.save_to(folder / "bank" / f"rank{rank}")
        (folder / f"data-rank{rank}.json").write_text(json.dumps({"items": [str(self.items[i].path.name)
                                                                              for i in self.seen[-10_000:]]}))

    def load_state(self, folder: Path, rank: int) -> None:
        src = folder / "bank" / f"rank{rank}"
        if src.exists():
            self.bank.load_from(src)
            self.bank.clear_orphans()

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            ema_update(self.ema, self._student_params(), self.cfg.ema_decay)

    def _student_params(self):
        return [(n, p) for n, p in self.base.unet.named_parameters() if p.requires_grad]

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
            kw["added_cond_kwargs"] = {**kw.get("added_cond_kwargs", {}),
                                       **self.style_ref.added_cond(x.shape[0], uncond, x.device)}
        if x.ndim == 5:  # [B, C, F, H, W]: the motion UNet attends to the text once per frame
            kw["encoder_hidden_states"] = kw["encoder_hidden_states"].repeat_interleave(x.shape[2], dim=0)
        return self.base.unet(x, t, **kw).sample

    def uncond(self, n: int) -> dict[str, torch.Tensor]:
        if self._uncond is None:
            if self.base.arch == "sdxl":  # force_zeros_for_empty_prompt, as SDXL was trained
                c = encode_prompts(self.base, [""], self.size)
                self._uncond = {k: (torch.zeros_like(v) if k != "time_ids" else v) for k, v in c.items()}
            else:
                self._uncond = encode_prompts(self.base, [""], self.size)
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()}

    def text_context(self, caption: str) -> dict[str, torch.Tensor]:
        """Text embeddings of one caption, computed once per caption (captions repeat every epoch)."""
        hit = self._text_cache.get(caption)
        if hit is None:
            hit = {k: v[0] for k, v in encode_prompts(self.base, [caption], self.size).items()}
            if len(self._text_cache) < 100_000:
                self._text_cache[caption] = hit
        return hit

    @torch.no_grad()
    def encode_latent(self, index: int, gen: torch.Generator) -> torch.Tensor:
        cached = self._latent_cache.get(index)
        if cached is not None:
            return cached
        cache = self.cfg.cache_latents
        frames = self.cfg.num_frames if self.cfg.video else 0
        pixels = load_pixels(self.items[index], self.cfg.resolution, None if cache else gen,
                             num_frames=frames, frame_stride=self.cfg.frame_stride, flip=not cache)
        if frames:  # [F,3,S,S] -> latents [4,F,h,w]: one noise level for the whole clip
            z0 = self.base.encode_latents(pixels.to(self.trainer.device, self.vae_dtype),
                                          None if cache else gen).movedim(0, 1)
        else:
            z0 = self.base.encode_latents(pixels[None].to(self.trainer.device, self.vae_dtype),
                                          None if cache else gen)[0]
        z0 = z0.float()
        if cache:
            self._latent_cache[index] = z0
        return z0

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents -> pixels; clips [B,C,F,h,w] decode the given frames (the discriminator is per frame)."""
        if latents.ndim == 5:
            picked = latents[:, :, frames] if frames is not None else latents
            flat = picked.movedim(2, 1).reshape(-1, *picked.shape[1:2], *picked.shape[3:])
            return self.base.decode_latents(flat)
        return self.base.decode_latents(latents)

    # -- one micro-step --------------------------------------------------------------------------------------
    def _gather(self, micro_step: int, gen: torch.Generator):
        """Per sample: a bank entry (with its own context) or a fresh start at n0."""
        device = self.trainer.device
        rows = []
        indices = self.sampler.indices(micro_step)
        self.seen.extend(indices)
        for item_index in indices:
            if self.offline is not None:
                rows.append(self._offline_row(item_index, gen))
                continue
            entry = self.bank.draw()
            if entry is not None:
                t = entry.tensors(self.bank.root, device=device)
                ctx = {k: t[k] for k in t if k not in ("state", "z0")}
                rows.append(dict(entry=entry, x=t["state"], n=entry.index, z0=t["z0"], ctx=ctx, w=entry.w,
                                 caption=entry.caption))
                continue
            item = self.items[item_index]
            z0 = self.encode_latent(item_index, gen)
            ctx = self.text_context(item.caption)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            x = add_noise(z0[None], noise[None], self.grid.alpha(torch.tensor([self.n0])).to(device))[0]
            w = float(self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand((), generator=gen))
            rows.append(dict(entry=None, x=x, n=self.n0, z0=z0, ctx=ctx, w=w, caption=item.caption))
        return rows

    def _offline_row(self, item_index: int, gen: torch.Generator) -> dict:
        """A precomputed (x_n, x_{n-1}) pair: the start index with probability 1 - ρ, else uniform below it
        (the online bank's stationary distribution, roughly)."""
        shard = item_index % len(self.offline)
        n0 = min(self.n0, self.offline.pair(shard, LAST_INDEX + 1, "cpu")["start_index"])
        if torch.rand((), generator=gen) >= self.cfg.rho or n0 <= LAST_INDEX + 1:
            n = n0
        else:
            n = int(torch.randint(LAST_INDEX + 1, n0, (), generator=gen))
        p = self.offline.pair(shard, n, self.trainer.device)
        return dict(entry=None, x=p["x"], x_prev=p["x_prev"], n=n, z0=p["z0"], ctx=p["ctx"], w=p["w"],
                    caption=p["caption"])

    def micro_step(self, micro_step: int):
        cfg, device = self.cfg, self.trainer.device
        gen = self.trainer.generator(micro_step)
        rows = self._gather(micro_step, gen)
        x = torch.stack([r["x"] for r in rows]).float()
        n = torch.tensor([r["n"] for r in rows], device=device)
        ctx = {k: torch.stack([r["ctx"][k] for r in rows]) for k in rows[0]["ctx"]}
        w = torch.tensor([r["w"] for r in rows], device=device)
        pt = self.base.prediction_type
        j = draw_target_index(n, self.window, gen)  # the target level s = τ_{j-1}
        a_s = self.grid.alpha_prev(j)
        with torch.no_grad():
            if "x_prev" in rows[0]:  # precomputed trajectory: the teacher's next state is on disk
                x_prev = torch.stack([r["x_prev"] for r in rows]).float()
            else:
                with self.teacher():  # one CFG'd DDIM step of the frozen teacher
                    cond = x0_eps(self.unet(x, n, ctx), x, self.grid.alpha(n), pt)
                    unc = x0_eps(self.unet(x, n, self.uncond(len(rows)), uncond=True), x, self.grid.alpha(n), pt)
                x0_t, eps_t = cfg_lcm(cond, unc, w)
                x_prev = jump(x0_t, eps_t, self.grid.alpha_prev(n))
                for i, r in enumerate(rows):  # advance / retire / keep: the context travels with the state
                    self.bank.step(r["entry"], r["n"] - 1, x_prev[i], {"z0": r["z0"], **r["ctx"]}
                                   if r["entry"] is None else None, r["caption"], r["w"], last_index=LAST_INDEX)
            # stop-gradient target from the teacher's next state, jumping to the same s
            with self.target():
                x0_tg, eps_tg = x0_eps(self.unet(x_prev, n - 1, ctx), x_prev, self.grid.alpha(n - 1), pt)
            target = jump(x0_tg, eps_tg, a_s)
        # student jump (with grad) from (x_n, τ_n) to the same s; after the target, so that swapping in EMA
        # weights for the target never touches a tensor the backward pass needs
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
        fake = self.decode(student, frames)
        g_adv = self.adv.generator_loss(fake, pooled)
        logs["loss/std"] = loss.item()
        yield "student", loss + cfg.adv_weight * g_adv, logs
        with torch.no_grad():  # real images noised to r < s (asymmetric), decoded
            s_t = torch.where(j > 0, self.grid.timesteps.to(device)[(j - 1).clamp(min=0)], torch.zeros_like(j))
            r = torch.tensor([self.adv.asymmetric_real_level(int(s), gen) for s in s_t], device=device)
            z0 = torch.stack([row["z0"] for row in rows]).float()
            a_r = self.base.schedule.alphas_cumprod.to(device)[r]
            real = self.decode(add_noise(z0, torch.randn(z0.shape, generator=gen).to(device), a_r), frames)
        d_loss, d_logs = self.adv.discriminator_loss(real, fake.detach(), pooled)
        yield "discriminator", d_loss, d_logs

    # -- previews and export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, z0, ctx, nfe: int | None, w: float, gen_seed: int) -> torch.Tensor:
        schedule = self.base.schedule
        uncond = self.uncond(z0.shape[0])

        def eps_fn(x_vp, t):
            t = torch.as_tensor(t).reshape(-1).to(x_vp.device).expand(x_vp.shape[0])
            out = self.unet_at(x_vp, t, ctx)
            if nfe is None:  # teacher: CFG (Imagen scale 1 + w)
                out_u = self.unet_at(x_vp, t, uncond, uncond=True)
                out = out_u + (1 + w) * (out - out_u)
            return out

        if nfe is None:  # teacher: every grid step from n0 (DDIM, gamma 0)
            ts = self.grid.timesteps[: self.n0 + 1].flip(0)
            sigmas = torch.cat([schedule.sigma(ts), torch.zeros(1)])
        else:
            sigmas = std_plan(nfe, self.cfg.start_strength, "trained_start").sigmas(schedule)
        sigmas = sigmas.to(z0.device)
        g = torch.Generator().manual_seed(gen_seed)
        x = z0 + sigmas[0] * torch.randn(z0.shape, generator=g).to(z0.device)
        denoiser = KDenoiser(eps_fn, schedule)
        return sample_std(denoiser, x, sigmas, disable=True, gamma=0.0, schedule=schedule)

    @torch.no_grad()
    def preview(self):
        from PIL import Image

        cfg = self.cfg
        if cfg.num_previews <= 0:
            return None
        items = self.items[: cfg.num_previews]
        if cfg.preview_images:
            items, _ = scan_folder(cfg.preview_images, cfg.style_prompt)
            items = items[: cfg.num_previews]
        rows = []
        for k, item in enumerate(items):
            frames = cfg.num_frames if cfg.video else 0
            pixels = load_pixels(item, cfg.resolution, None, num_frames=frames, frame_stride=cfg.frame_stride,
                                 flip=False).to(self.trainer.device, self.vae_dtype)
            if frames:  # the clip's first and last frames, stylized as one clip
                z0 = self.base.encode_latents(pixels).movedim(0, 1)[None]
                pixels = torch.cat([pixels[:1], pixels[-1:]], dim=-1)
            else:
                pixels = pixels[None]
                z0 = self.base.encode_latents(pixels)
            ctx = encode_prompts(self.base, [item.caption], self.size)
            w = (cfg.w_min + cfg.w_max) / 2
            def show(latents):
                if latents.ndim == 5:
                    first_last = self.decode(latents, [0, latents.shape[2] - 1])
                    return torch.cat([first_last[:1], first_last[1:]], dim=-1)
                return self.decode(latents)
            with self.teacher():
                cols = [pixels.float(), show(self._sample(z0, ctx, None, w, k))]
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
                  "resolution": cfg.resolution, "rr": cfg.range_rate, "steps": self.trainer.step}
        return export_lora(self.base.unet, ADAPTER, Path(folder), self.export_name() + suffix, cfg.lora_rank,
                           cfg.lora_alpha, values, self.base.arch)
