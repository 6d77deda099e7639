"""The asymmetric adversarial loss of STD (docs/official-std-code.md §4), with the official code's bugs fixed.

* **Fake**: the student's jump x̂_s decoded to pixels (with gradient to the student). **Real**: a training image
  noised to a level ``r < s`` and decoded, so the student's intermediate state is pushed towards a *cleaner* image
  than its own level (sharper style, less texture noise). :meth:`AdversarialLoss.asymmetric_real_level` draws r.
* **Features**: a frozen DINOv2 ViT-S/14 (``transformers.Dinov2Model``), patch tokens of the hooked blocks (default
  2, 5, 8, 11) after the final layer norm, under differentiable augmentation (colour, translation 1/8, cutout 0.2),
  with probability 0.5 a random 224×224 crop (the same for the whole batch), an area resize to 224×224, then ImageNet
  normalisation: 256 patch tokens per block, as the official discriminator sees, whatever input size the DINOv2
  config states (the Hub's config says 518, which would give 1369 tokens and never take the crop at 512 px).
* **Discriminator**: one StyleGAN-T-style head per hook (spectral-normalised 1-D convolutions, local batch norm over
  virtual batches of 8, a circular k=9 residual block), projected onto the text condition. The condition is the
  pooled text embedding the base model already computes (no 1.4 B-parameter extra text model).
* **Losses**: hinge for D (the official "wgan" variant is hinge minus a constant), ``-mean D(fake)`` for G, plus a
  gradient penalty ``(‖∇_features D‖ - 1)²`` on DINO features of real/fake interpolations (weight 1e-5; the ×5
  adaptive rule is available and off by default).
* **Fixed**: the generator term is computed with D's parameters frozen, so it never writes into D's gradients; D's
  gradients accumulate like the student's (the trainer steps both at the sync step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from comfyui_std.core.errors import STDInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the discriminator's input side (the official 224, not the model config's image_size)
DINO_SIZE = 224


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected images [B, 3, H, W] in [-1, 1], got {shape}")


def diff_augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """DiffAugment colour + translation (1/8) + cutout (0.2) on [-1, 1] images; differentiable in ``x``."""
    b, _, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(shape, generator=generator).to(dev, x.dtype)

    x = x + (rand(b, 1, 1, 1) - 0.5)                                         # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand(b, 1, 1, 1) * 2) + mean                          # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand(b, 1, 1, 1) + 0.5) + mean                        # contrast
    # translation by up to 1/8 of the size, zero padding (as a sampling grid, so gradients flow)
    shift = (rand(b, 2) * 2 - 1) * 0.125 * 2                                 # in normalised [-1, 1] units
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    # cutout: a square of 0.2 of the size, zeroed
    ch, cw = max(1, int(h * 0.2 + 0.5)), max(1, int(w * 0.2 + 0.5))
    cy = (rand(b) * (h + 1 - ch)).long()
    cx = (rand(b) * (w + 1 - cw)).long()
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    keep = ~(((yy >= cy.view(b, 1, 1)) & (yy < (cy + ch).view(b, 1, 1)))
             & ((xx >= cx.view(b, 1, 1)) & (xx < (cx + cw).view(b, 1, 1))))
    return x * keep[:, None].to(x.dtype)


class DinoFeatures(nn.Module):
    """Frozen DINOv2: hooked blocks' patch tokens [B, N, C] of preprocessed [-1, 1] images."""

    def __init__(self, model, hooks=(2, 5, 8, 11), augment: bool = True, crop_p: float = 0.5):
        super().__init__()
        layers = int(model.config.num_hidden_layers)
        hooks = [int(h) for h in hooks]
        if not hooks or any(h < 0 or h >= layers for h in hooks):
            raise STDInputError("dino_hooks", f"{hooks} must be block indices of the {layers}-block DINOv2")
        self.model = model.eval().requires_grad_(False)
        self.hooks = hooks
        self.augment = augment
        self.crop_p = crop_p
        self.size = DINO_SIZE
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images, "images")
        x = diff_augment(images, generator) if self.augment else images
        x = (x + 1) / 2
        h, w = x.shape[-2:]
        if self.augment and min(h, w) > self.size and torch.rand((), generator=generator) < self.crop_p:
            top = int(torch.randint(h - self.size + 1, (), generator=generator))
            left = int(torch.randint(w - self.size + 1, (), generator=generator))
            x = x[..., top:top + self.size, left:left + self.size]  # the same crop for the whole batch
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return (x - self.mean.to(x)) / self.std.to(x)

    def tokens(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        norm = self.model.layernorm
        return [norm(out.hidden_states[h + 1])[:, 1:] for h in self.hooks]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.tokens(self.preprocess(images, generator))


class BatchNormLocal(nn.Module):
    """Batch norm with statistics over virtual batches of ``virtual_bs`` samples and all tokens."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L]
        b = x.shape[0]
        groups = math.ceil(b / self.virtual_bs)
        if b % groups:
            groups = 1
        g = x.view(groups, b // groups, *x.shape[1:])
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) / torch.sqrt(var + self.eps)
        return g.view_as(x) * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


def _sn_conv(cin: int, cout: int, k: int, circular: bool = False) -> nn.Module:
    conv = nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular" if circular else "zeros")
    return nn.utils.parametrizations.spectral_norm(conv)


class DiscHead(nn.Module):
    def __init__(self, channels: int, cond_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.main = nn.Sequential(_sn_conv(channels, channels, 1), BatchNormLocal(channels), nn.LeakyReLU(0.2))
        self.res = nn.Sequential(_sn_conv(channels, channels, 9, circular=True), BatchNormLocal(channels),
                                 nn.LeakyReLU(0.2))
        self.out = _sn_conv(channels, cmap_dim, 1)
        self.cmap = nn.Linear(cond_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # [B, N, C], [B, P] -> [B, N]
        x = self.main(tokens.transpose(1, 2))
        x = (self.res(x) + x) / math.sqrt(2)
        h = self.out(x)
        c = self.cmap(cond).unsqueeze(-1)
        return (h * c).sum(1) / math.sqrt(self.cmap_dim)


class ProjectedDiscriminator(nn.Module):
    def __init__(self, channels: int, num_heads: int, cond_dim: int):
        super().__init__()
        self.cond_dim = int(cond_dim)
        self.heads = nn.ModuleList(DiscHead(channels, cond_dim) for _ in range(num_heads))

    def forward(self, features: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 2 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond: expected [B, {self.cond_dim}] text embeddings, got {tuple(cond.shape)}")
        cond = cond.to(features[0].dtype)
        return torch.cat([head(f, cond) for head, f in zip(self.heads, features)], dim=1)


class AdversarialLoss(nn.Module):
    def __init__(self, features: DinoFeatures, cond_dim: int, gp_weight: float = 1e-5, adaptive_gp: bool = False):
        super().__init__()
        self.features = features
        self.disc = ProjectedDiscriminator(features.width, len(features.hooks), cond_dim)
        self.gp_weight = float(gp_weight)
        self.adaptive_gp = adaptive_gp
        self.register_buffer("gp_scale", torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0))
        self.register_buffer("last_increase", torch.tensor(0))

    def trainable_parameters(self):
        return self.disc.parameters()

    def state_dict(self, *args, **kwargs):  # the frozen DINOv2 is not state
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("features.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The discriminator's state as :meth:`state_dict` gives it (heads, penalty schedule), loaded strictly: a
        missing, foreign or reshaped tensor is refused naming it. Only the frozen DINOv2 (``features.*``), which is
        not state and stays as built, may be absent."""
        want = self.state_dict()
        missing = sorted(set(want) - set(state_dict))
        extra = sorted(set(state_dict) - set(want))
        reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
                    if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
        if strict and (missing or extra or reshaped):
            found = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                     ((missing, "missing"), (extra, "unexpected"), (reshaped, "of another shape")) if keys]
            raise STDInputError("resume", f"the checkpoint's discriminator does not match this run's: "
                                          f"{'; '.join(found)}. Resume with the options it was trained with "
                                          "(dino, dino_hooks), or start a new --output")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        left = [k for k in result.missing_keys if not k.startswith("features.")]
        if strict and (left or result.unexpected_keys):  # the key check above makes this unreachable
            raise RuntimeError(f"discriminator state: {left[:3]} missing, {result.unexpected_keys[:3]} unexpected")
        return result

    @staticmethod
    def asymmetric_real_level(s: int, generator: torch.Generator | None = None) -> int:
        """r ~ U{0, …, s-1}: the real image is always less noisy than the student's level s (s = 0 gives 0)."""
        s = int(s)
        return 0 if s <= 0 else int(torch.randint(s, (), generator=generator))

    def generator_loss(self, fake: torch.Tensor, cond: torch.Tensor, generator=None) -> torch.Tensor:
        """-mean D(fake), with D frozen: gradients reach the fake images only."""
        _check_images(fake, "fake")
        flags = [p.requires_grad for p in self.disc.parameters()]
        self.disc.requires_grad_(False)
        try:
            return -self.disc(self.features(fake, generator), cond).float().mean()
        finally:
            for p, f in zip(self.disc.parameters(), flags):
                p.requires_grad_(f)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor, generator=None):
        """Hinge loss on detached inputs plus the gradient penalty; returns (loss, logs)."""
        _check_images(real, "real")
        _check_images(fake, "fake")
        real_in = self.features.preprocess(real.detach(), generator)
        fake_in = self.features.preprocess(fake.detach(), generator)
        with torch.no_grad():
            real_f, fake_f = self.features.tokens(real_in), self.features.tokens(fake_in)
        d_real, d_fake = self.disc(real_f, cond).float(), self.disc(fake_f, cond).float()
        hinge = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        loss, logs = hinge, {"adv/d_real": d_real.mean().item(), "adv/d_fake": d_fake.mean().item()}
        if self.gp_weight > 0:
            a = torch.rand(real_in.shape[0], 1, 1, 1, generator=generator).to(real_in)
            with torch.no_grad():
                mixed = [f.detach().requires_grad_(True) for f in self.features.tokens(a * real_in + (1 - a) * fake_in)]
            with torch.enable_grad():
                out = self.disc(mixed, cond).sum()
                grads = torch.autograd.grad(out, mixed, create_graph=True)
            norm = torch.cat([g.flatten(1) for g in grads], dim=1).norm(2, dim=1)
            gp = ((norm - 1) ** 2).mean()
            loss = loss + self.gp_weight * self.gp_scale * gp
            logs["adv/gp"] = gp.item()
            self._adapt(gp.item())
        return loss, logs

    def _adapt(self, gp: float) -> None:
        """Optional rule of the official code: ×5 the penalty weight when GP >= 100, at most every 500 steps."""
        self.steps += 1
        if self.adaptive_gp and gp >= 100 and int(self.steps - self.last_increase) > 500:
            self.gp_scale *= 5
            self.last_increase.copy_(self.steps)


def tiny_dino(layers: int = 2):
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2,
                                        image_size=28, patch_size=14))


def load_dino(dino: str):
    """DINOv2 from a local folder or Hub id (safetensors only), loaded strictly: a missing, foreign or reshaped weight
    is refused naming it."""
    from transformers import Dinov2Model

    try:
        model, info = Dinov2Model.from_pretrained(dino, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise STDInputError("dino", f"could not load DINOv2 from '{dino}' ({str(err).splitlines()[0]}); give a local "
                                    "folder with config.json + model.safetensors, or run once online for "
                                    "facebook/dinov2-small") from None
    kinds = {"missing_keys": "weights it lacks", "unexpected_keys": "tensors a DINOv2 has no place for",
             "mismatched_keys": "tensors of another shape", "error_msgs": "tensors that could not be loaded"}
    found = [f"{len(info[k])} {what} (e.g. {sorted(map(str, info[k]))[0]})" for k, what in kinds.items() if info.get(k)]
    if found:
        raise STDInputError("dino", f"'{dino}' is not a complete DINOv2 model: {'; '.join(found)}")
    return model


def build_adversarial(dino: str, hooks, cond_dim: int, gp_weight: float = 1e-5, seed: int = 0,
                      adaptive_gp: bool = False) -> AdversarialLoss:
    """The adversarial loss with DINOv2 from a local folder or Hub id (``facebook/dinov2-small``), or ``tiny``; the
    discriminator heads are initialised from ``seed``."""
    model = tiny_dino(max(int(h) for h in hooks) + 1) if dino == "tiny" else load_dino(dino)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AdversarialLoss(DinoFeatures(model, hooks), cond_dim, gp_weight, adaptive_gp=adaptive_gp)
