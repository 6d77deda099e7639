"""SiD-LSG on the shared trainer skeleton: data-free one-step distillation with long and short guidance.

One frozen base UNet carries two LoRA adapters: ``gen`` (the one-step generator G_θ) and ``fake`` (the fake score
f_ψ); the teacher f_φ is the base with adapters off, so the run holds one UNet (docs/official-sid-lsg-code.md §7).
Each step has two phases, in this order: the fake score is updated on the generator's (stop-gradient) samples, then
the generator on a fresh batch with the SiD loss, whose gradient flows through the fake score and the teacher into
x_g. LSG applies CFG with κ1 to the fake score while it is trained, κ2 = κ3 when it is evaluated in the generator
loss, κ4 to the teacher.

The two measured peft pitfalls are handled: adapter switching rewrites ``requires_grad`` (so the flags of the
trained adapter are set explicitly after the last switch of a phase, before backward), and gradient checkpointing
cannot span adapter switches (so it is refused).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from comfyui_std.core.errors import STDInputError, check_range
from comfyui_std.core.vp import add_noise
from std_hf.base import encode_prompts, load_base, unet_kwargs
from training.common.config import CommonConfig, option, read_text_lines, validate_common
from training.common.ema import ema_copy, ema_update, swapped
from training.common.export import atomic_folder, export_lora
from training.common.adapters import adapter_params, add_lora
from training.common.precision import cast_frozen, vae_dtype
from training.sid_lsg.losses import (ema_beta, fake_score_loss, generator_input, guided, sample_t,
                                     sid_generator_loss, x0_from_eps)

log = logging.getLogger("training")
GEN, FAKE = "gen", "fake"


@dataclasses.dataclass
class SiDConfig(CommonConfig):
    output: str = option("outputs/sid_lsg", "Run folder (inside outputs/, which git ignores): config.json, train.log, checkpoints/, logs/, previews/ and "
                                           "the exported LoRA.", free=True)
    prompts: str = option("", "UTF-8 text file with one training prompt per line (no images are used).")
    t_init: int = option(625, "Timestep the one-step generator is evaluated at (625: sigma_init ≈ 2.5).")
    t_min: int = option(20, "Smallest diffusion timestep of the losses.")
    t_max: int = option(979, "Largest diffusion timestep of the losses.")
    alpha: float = option(1.0, "SiD α (the loss is L2 - α·L1; SiD-LSG uses 1).")
    kappa1: float = option(2.0, "κ1: CFG of the fake score while it is trained (--cfg_train_fake).")
    kappa2: float = option(2.0, "κ2 = κ3: CFG of the fake score inside the generator loss (--cfg_eval_fake).")
    kappa4: float = option(2.0, "κ4: CFG of the teacher inside the generator loss (--cfg_eval_real).")
    prompt_dropout: float = option(0.1, "Empty-prompt rate in the fake phase when κ1 or κ2 ≠ 1.")
    fake_learning_rate: float = option(1e-5, "Learning rate of the fake-score LoRA.")
    fake_rank: int = option(0, "Rank of the fake-score LoRA (0 = lora_rank).")
    ema_halflife_kimg: float = option(50.0, "Half-life of the generator EMA in thousands of images (0 = no EMA).")
    ema_rampup: float = option(0.05, "EMA ramp-up ratio (half-life <= images seen × ramp-up).")
    preview_prompts: list = option([], "Prompts of the preview grid (default: the first prompts of the file).",
                                   free=True)
    full_finetune: bool = option(False, "Train full copies of the UNet for the generator and the fake score (the "
                                        "original recipe; three UNets in memory, for large GPUs) instead of two "
                                        "LoRA adapters; the generator is exported as merged diffusers weights.")


PRESETS = {
    "tiny": {"_doc": "CPU smoke run on a tiny random model", "base": "tiny", "resolution": 64, "max_steps": 4,
             "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 1e-4, "fake_learning_rate": 1e-4,
             "lr_warmup": 0, "checkpoint_every": 2, "device": "cpu", "num_previews": 1},
    "sd15-24gb": {"_doc": "SD1.5 at 512 on a 24 GB GPU (bf16, rank 64 for both adapters)", "resolution": 512,
                  "mixed_precision": "bf16", "lora_rank": 64, "lora_alpha": 64.0, "max_steps": 20000,
                  "batch_size": 2, "grad_accum": 8},
    "sd15-12gb": {"_doc": "SD1.5 at 512 on a 12 GB GPU (bf16, rank 32, batch 1 x 16)", "resolution": 512,
                  "mixed_precision": "bf16", "lora_rank": 32, "lora_alpha": 32.0, "max_steps": 20000,
                  "batch_size": 1, "grad_accum": 16},
}


def read_prompts(path: str) -> list[str]:
    """The training prompts: non-empty lines of a UTF-8 text file (a binary or empty file is refused)."""
    if not path:
        raise STDInputError("prompts", "give a text file with one prompt per line (--prompts)")
    return read_text_lines(path, "prompts")


def validate(cfg: "SiDConfig") -> None:
    validate_common(cfg)
    for name in ("t_min", "t_max", "t_init"):
        check_range(name, getattr(cfg, name), 0, 999, kind=int)
    if cfg.t_min > cfg.t_max:
        raise STDInputError("t_max", f"got {cfg.t_max}, must be >= t_min ({cfg.t_min})")
    for name in ("kappa1", "kappa2", "kappa4"):
        check_range(name, getattr(cfg, name), 0.0, 50.0)
    check_range("alpha", cfg.alpha, 0.0, 10.0)
    check_range("prompt_dropout", cfg.prompt_dropout, 0.0, 1.0)
    check_range("fake_learning_rate", cfg.fake_learning_rate, 0.0, 1.0, low_open=True)
    check_range("fake_rank", cfg.fake_rank, 0, 4096, kind=int)
    check_range("ema_halflife_kimg", cfg.ema_halflife_kimg, 0.0, 1e6)
    check_range("ema_rampup", cfg.ema_rampup, 0.0, 1.0)
    if cfg.gradient_checkpointing:
        raise STDInputError("gradient_checkpointing", "cannot be combined with SiD's adapter switching inside "
                            "one backward pass (recomputation would run under the wrong adapter)")


class SiDMethod:
    name = "sid_lsg"
    phases = (FAKE, GEN)
    adam_betas = (0.0, 0.999)  # no momentum, as the original

    def __init__(self, cfg: SiDConfig, trainer):
        self.cfg = cfg
        self.trainer = trainer
        self.training: str | None = None  # the adapter whose phase runs (see train_only)

    def setup(self):
        cfg = self.cfg
        validate(cfg)
        self.prompts = read_prompts(cfg.prompts)
        # frozen weights are read in the dtype they train in (host RAM, see training/README); full copies of the
        # UNet are trained, so with --full-finetune the UNet is read in fp32
        read = torch.float32 if cfg.full_finetune else self.trainer.weight_dtype
        self.vae_dtype = vae_dtype(cfg)
        base = self.trainer.in_turn(lambda: load_base(cfg.base, read, cfg.tokenizer or None, seed=cfg.seed,
                                                      vae_dtype=self.vae_dtype))
        for r in base.reports:
            log.info("base %s: %s", base.name, r.line())
        if base.prediction_type != "epsilon":
            raise STDInputError("base", "SiD-LSG needs an ε-prediction model (SD1.5, SD2.1-base, SDXL)")
        base.unet.requires_grad_(False)
        base.vae.requires_grad_(False)
        for t in base.text_encoders:
            t.requires_grad_(False)
        if cfg.full_finetune:  # G and f_ψ as full fp32 copies of the teacher, as the original code
            import copy
            self.nets = {None: base.unet, GEN: copy.deepcopy(base.unet), FAKE: copy.deepcopy(base.unet)}
            for role in (GEN, FAKE):
                self.nets[role].requires_grad_(True)
        else:
            add_lora(base.unet, GEN, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
            fake_rank = cfg.fake_rank or cfg.lora_rank
            add_lora(base.unet, FAKE, fake_rank, cfg.lora_alpha * fake_rank / cfg.lora_rank, cfg.lora_targets,
                     cfg.seed + 1)
            self.nets = {None: base.unet, GEN: base.unet, FAKE: base.unet}
        cast_frozen(base, self.trainer.weight_dtype)  # frozen weights to the preset's dtype; trained ones fp32
        for net in {id(n): n for n in self.nets.values()}.values():
            net.to(self.trainer.device)
        base.to(self.trainer.device, vae_dtype=self.vae_dtype)
        self.base = base
        self.acp = base.schedule.alphas_cumprod.to(self.trainer.device)
        self.size = (cfg.resolution, cfg.resolution)
        self.latent_shape = self._latent_shape()
        self.active = base.unet
        self.params = {name: [p for _, p in self._named(name)] for name in (GEN, FAKE)}
        self.ema = ema_copy(self._named(GEN)) if cfg.ema_halflife_kimg > 0 else None
        self._null = None
        self.images_seen = 0

    def _named(self, role: str):
        """(name, parameter) of the trained weights of a role: its LoRA adapter, or its whole UNet copy."""
        if self.cfg.full_finetune:
            return list(self.nets[role].named_parameters())
        return adapter_params(self.base.unet, role)

    def _latent_shape(self):
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.size, device=self.trainer.device,
                                dtype=next(self.base.vae.parameters()).dtype)
            return tuple(self.base.encode_latents(probe).shape[1:])

    def param_groups(self) -> dict:
        return {FAKE: (self.params[FAKE], self.cfg.fake_learning_rate, self.cfg.max_grad_norm),
                GEN: (self.params[GEN], self.cfg.learning_rate, self.cfg.max_grad_norm)}

    # -- adapters --------------------------------------------------------------------------------------------
    def use(self, adapter: str | None):
        """Switch the UNet to the teacher (None), the generator or the fake score. peft's ``set_adapter`` turns
        ``requires_grad`` on for the adapter it activates; the flags of the phase being trained
        (:meth:`train_only`) are put back at once, so the generator phase's fake-score and teacher forwards save no
        activations for the fake adapter's weight gradients."""
        self.active = self.nets[adapter]
        if self.cfg.full_finetune:
            return
        if adapter is None:
            self.base.unet.disable_adapters()
        else:
            self.base.unet.enable_adapters()
            self.base.unet.set_adapter(adapter)
        if self.training is not None:
            self._set_trainable(self.training)

    def train_only(self, adapter: str):
        """Only ``adapter``'s weights require grad from now on (until another phase), whichever adapter runs."""
        self.training = adapter
        self._set_trainable(adapter)

    def _set_trainable(self, adapter: str):
        for name, params in self.params.items():
            for p in params:
                p.requires_grad_(name == adapter)

    # -- network calls ---------------------------------------------------------------------------------------
    def context(self, prompts: list[str]) -> dict:
        return encode_prompts(self.base, prompts, self.size)

    def null(self, n: int) -> dict:
        if self._null is None:
            c = encode_prompts(self.base, [""], self.size)
            if self.base.arch == "sdxl":
                c = {k: (torch.zeros_like(v) if k != "time_ids" else v) for k, v in c.items()}
            self._null = c
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def _call(self, x, t, ctx):
        """The active network on (x, t, ctx), inputs in its weights' dtype, output fp32."""
        net = self.active
        dtype = next(p for n, p in net.named_parameters() if ".lora_" not in n).dtype
        kw = unet_kwargs(self.base, ctx)
        kw["encoder_hidden_states"] = kw["encoder_hidden_states"].to(dtype)
        if "added_cond_kwargs" in kw:
            kw["added_cond_kwargs"] = {k: v.to(dtype) for k, v in kw["added_cond_kwargs"].items()}
        return net(x.to(dtype), t, **kw).sample.float()

    def eps(self, x, t, ctx, kappa: float):
        """Guided ε of the active network; CFG as one 2B-batch forward."""
        if kappa == 1:
            return self._call(x, t, ctx)
        both = {k: torch.cat([a, b]) for (k, a), b in zip(self.null(x.shape[0]).items(), ctx.values())}
        out = self._call(torch.cat([x, x]), torch.cat([t, t]), both)
        eps_u, eps_c = out.chunk(2)
        return guided(eps_u, eps_c, kappa)

    def generate(self, z, ctx):
        """x_g = G(z, c): the generator UNet once at t_init on s_init·z, then the closed-form x0."""
        t = torch.full((z.shape[0],), self.cfg.t_init, device=z.device, dtype=torch.long)
        x_in = generator_input(z, self.acp[t])
        eps = self._call(x_in, t, ctx)
        return x0_from_eps(x_in, eps, self.acp[t])

    def _batch(self, micro_step: int, gen: torch.Generator, dropout: bool):
        n = len(self.prompts)
        idx = [int(i) for i in torch.randint(n, (self.cfg.batch_size,), generator=gen)]
        prompts = [self.prompts[i] for i in idx]
        if dropout:
            keep = torch.rand(len(prompts), generator=gen) >= self.cfg.prompt_dropout
            prompts = [p if k else "" for p, k in zip(prompts, keep)]
        device = self.trainer.device
        z = torch.randn((len(prompts), *self.latent_shape), generator=gen).to(device)
        eps = torch.randn(z.shape, generator=gen).to(device)
        t = sample_t(len(prompts), self.cfg.t_min, self.cfg.t_max, gen).to(device)
        return prompts, z, eps, t

    def micro_step(self, micro_step: int, phase: str):
        cfg, clock = self.cfg, self.trainer.phase
        if phase == FAKE:
            gen = self.trainer.generator(micro_step, salt=1)
            dropout = cfg.kappa1 != 1 or cfg.kappa2 != 1
            prompts, z, eps, t = self._batch(micro_step, gen, dropout)
            with clock("text"):
                ctx = self.context(prompts)
            with torch.no_grad(), clock("generator"):
                self.use(GEN)
                x_g = self.generate(z, ctx)
            a = self.acp[t]
            x_t = add_noise(x_g.float(), eps.float(), a)  # in float32, as the losses
            with clock("fake_score"):
                self.use(FAKE)
                self.train_only(FAKE)
                loss = fake_score_loss(self.eps(x_t, t, ctx, cfg.kappa1), eps)
            yield FAKE, loss, {}
            return
        gen = self.trainer.generator(micro_step, salt=2)
        prompts, z, eps, t = self._batch(micro_step, gen, False)
        with clock("text"):
            ctx = self.context(prompts)
        with clock("generator"):
            self.use(GEN)
            self.train_only(GEN)  # before the forward, so the generator's weights are in the graph
            x_g = self.generate(z, ctx)
        a = self.acp[t]
        x_t = add_noise(x_g.float(), eps.float(), a)  # in float32, as the losses
        with clock("fake_score"):
            self.use(FAKE)
            y_fake = x0_from_eps(x_t, self.eps(x_t, t, ctx, cfg.kappa2), a)
        with clock("teacher"):
            self.use(None)
            y_real = x0_from_eps(x_t, self.eps(x_t, t, ctx, cfg.kappa4), a)
        self.use(GEN)
        self.train_only(GEN)
        loss = sid_generator_loss(x_g, y_real, y_fake, cfg.alpha)
        self.images_seen += len(prompts) * self.trainer.world
        yield GEN, loss, {"train/x_g_std": x_g.detach().std().item()}

    def after_optimizer_step(self) -> None:
        if self.ema is None:
            return
        beta = ema_beta(self.cfg.batch_size * self.cfg.grad_accum * self.trainer.world, self.images_seen,
                        self.cfg.ema_halflife_kimg, self.cfg.ema_rampup)
        ema_update(self.ema, self._named(GEN), beta)

    # -- state -----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        out = {f"{name}.{n}": p for name in (GEN, FAKE) for n, p in self._named(name)}
        if self.ema is not None:
            out.update({f"ema.{n}": v for n, v in self.ema.items()})
        return out

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        params = {f"{name}.{n}": p for name in (GEN, FAKE) for n, p in self._named(name)}
        for k, v in sd.items():
            if k in params:
                params[k].data.copy_(v)
            elif k.startswith("ema.") and self.ema is not None:
                self.ema[k[4:]].copy_(v)

    def save_state(self, folder: Path, rank: int) -> None:
        if rank == 0:
            (folder / "sid_state.txt").write_text(str(self.images_seen))

    def load_state(self, folder: Path, rank: int) -> None:
        f = folder / "sid_state.txt"
        if f.exists():
            self.images_seen = int(f.read_text())

    def ema_weights(self):
        """The generator with its EMA weights (what is exported and previewed)."""
        return swapped(self._named(GEN), self.ema)

    # -- previews and export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self):
        from PIL import Image

        cfg = self.cfg
        if cfg.num_previews <= 0:
            return None
        prompts = (cfg.preview_prompts or self.prompts)[: cfg.num_previews]
        g = torch.Generator().manual_seed(cfg.seed)
        z = torch.randn((len(prompts), *self.latent_shape), generator=g).to(self.trainer.device)
        ctx = self.context(prompts)
        with self.ema_weights():
            self.use(GEN)
            one_step = self.base.decode_latents(self.generate(z, ctx))
        grid = torch.cat(list(one_step.clamp(-1, 1)), dim=-1)
        arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def export(self, folder: Path, suffix: str = "") -> list[Path]:
        cfg = self.cfg
        name = (cfg.name or f"sid_lsg_{self.base.arch}_{Path(self.base.name).stem}_k{cfg.kappa4:g}") + suffix
        values = {"method": "sid_lsg", "t_init": cfg.t_init, "nfe": 1, "kappa1": cfg.kappa1, "kappa2": cfg.kappa2,
                  "kappa3": cfg.kappa2, "kappa4": cfg.kappa4, "alpha": None, "base_model": self.base.name,
                  "resolution": cfg.resolution, "steps": self.trainer.step}
        with self.ema_weights():
            if cfg.full_finetune:  # merged weights: the generator UNet as a diffusers folder, written atomically
                out = Path(folder) / f"{name}_unet"
                with atomic_folder(out) as tmp:
                    self.nets[GEN].save_pretrained(str(tmp))
                    (tmp / "std_metadata.json").write_text(json.dumps(values, indent=1))
                return [out]
            return export_lora(self.base.unet, GEN, Path(folder), name, cfg.lora_rank, cfg.lora_alpha, values,
                               self.base.arch)
