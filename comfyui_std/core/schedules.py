"""Discrete DDPM noise schedules in the two coordinate systems the project meets.

* VP (diffusers): ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``; models are called on ``x_t`` and an
  integer timestep ``t``.
* VE (k-diffusion / ComfyUI): ``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``;
  samplers see ``model(x, sigma) -> denoised``.

``x_VE = x_VP / sqrt(abar_t)``. :class:`DiscreteSchedule` offers ``sigma(t)`` and ``timestep(sigma)`` with the same
interpolation rules as ComfyUI's ``ModelSamplingDiscrete``, so the samplers in :mod:`.sampling` can take either
object as their ``schedule``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import STDInputError
from .vp import PREDICTION_TYPES, per_sample

#: beta schedules by their diffusers name. ComfyUI calls ``scaled_linear`` "linear" and ``linear`` "sqrt_linear".
BETA_SCHEDULES = ("scaled_linear", "linear")


def make_betas(beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Betas in float64. ``scaled_linear`` is SD1.x/SDXL's schedule (linear in sqrt(beta))."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    raise STDInputError("beta_schedule", f"got {beta_schedule!r}, supported: {', '.join(BETA_SCHEDULES)}")


class DiscreteSchedule:
    """A 1000-step (by default) DDPM schedule with VP and VE views.

    Args:
        beta_schedule: ``"scaled_linear"`` (SD1.5, SDXL) or ``"linear"``.
        num_train_timesteps: number of discrete training timesteps.
        beta_start, beta_end: end points of the beta schedule.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; used by :meth:`denoised`.
    """

    def __init__(self, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise STDInputError("prediction_type", f"got {prediction_type!r}, supported: {', '.join(PREDICTION_TYPES)}")
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod.float()
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @classmethod
    def from_config(cls, config) -> "DiscreteSchedule":
        """Build from a diffusers scheduler config (dict or FrozenDict)."""
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        if get("trained_betas") is not None:
            raise STDInputError("scheduler config", "trained_betas are not supported; use a scaled_linear or linear schedule")
        if get("rescale_betas_zero_snr", False):
            raise STDInputError("scheduler config", "zero-terminal-SNR schedules are not supported by the STD plan")
        return cls(beta_schedule=get("beta_schedule", "scaled_linear"),
                   num_train_timesteps=get("num_train_timesteps", 1000),
                   beta_start=get("beta_start", 0.00085), beta_end=get("beta_end", 0.012),
                   prediction_type=get("prediction_type", "epsilon"))

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma(self, timestep) -> torch.Tensor:
        """sigma at (possibly fractional) timesteps; log-linear interpolation between integers."""
        timestep = torch.as_tensor(timestep)
        t = timestep.float().clamp(0, self.num_train_timesteps - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def timestep(self, sigma) -> torch.Tensor:
        """Nearest integer timestep (in log-sigma) for each sigma; returns int64."""
        sigma = torch.as_tensor(sigma)
        dists = sigma.float().log().reshape(-1)[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    # Coordinate changes -------------------------------------------------------------------------------------------
    @staticmethod
    def ve_to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
        """``x_VP = x_VE / sqrt(1 + sigma^2)``."""
        return x / (1.0 + per_sample(sigma, x) ** 2) ** 0.5

    def denoised(self, model_output: torch.Tensor, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """x0 from a network output under this schedule's parameterisation (VE input coordinates)."""
        return denoised_from_output(model_output, x_ve, sigma, self.prediction_type)


def denoised_from_output(model_output: torch.Tensor, x_ve: torch.Tensor, sigma, prediction_type: str = "epsilon") -> torch.Tensor:
    """Convert a network output to the denoised estimate x0.

    ``epsilon``: x0 = x - sigma * eps. ``v_prediction`` (v = alpha*eps - s*x0 in VP form):
    x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v. ``sample``: x0 = output.
    """
    s = per_sample(sigma, x_ve)
    if prediction_type == "epsilon":
        return x_ve - s * model_output
    if prediction_type == "v_prediction":
        return x_ve / (1 + s ** 2) - model_output * s / (1 + s ** 2) ** 0.5
    if prediction_type == "sample":
        return model_output
    raise STDInputError("prediction_type", f"got {prediction_type!r}, supported: {', '.join(PREDICTION_TYPES)}")


class KDenoiser(torch.nn.Module):
    """Wrap a VP network ``fn(x_vp, timestep, **kw) -> output`` as a k-diffusion denoiser ``(x, sigma) -> x0``.

    This is how the Gradio app and the trainer drive a diffusers ``UNet2DConditionModel`` with the same samplers the
    ComfyUI nodes use. ``fn`` receives integer-valued float timesteps (the nearest training timestep of ``sigma``).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], schedule: DiscreteSchedule):
        super().__init__()
        self.fn = fn
        self.schedule = schedule

    #: sampler-level keys of ``extra_args`` that are not network inputs
    SAMPLER_KEYS = ("seed", "denoise_mask", "model_options")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k not in self.SAMPLER_KEYS}
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = self.schedule.timestep(sigma.cpu()).to(x.device)
        out = self.fn(self.schedule.ve_to_vp(x, sigma), t, **kwargs)
        return self.schedule.denoised(out, x, sigma)
