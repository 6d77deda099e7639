"""Single-trajectory distillation math, pure torch (docs/official-std-code.md §2–3, with the official code's bugs
fixed).

Everything lives on the 50-step DDIM grid ``τ_n = 20 n + 19`` (n = 0..49) of the 1000-step schedule, the same grid
``comfyui_std.core.plan`` uses at inference, so a student trained here starts where the nodes and the app start it.

* the start index is ``n0 = ceil(50 η)`` (:func:`comfyui_std.core.plan.trained_start_index`);
* the teacher advances a state one grid step per training step with a CFG'd DDIM step (LCM form, scale ``w``);
* the student at ``(x_n, τ_n)`` and the stop-gradient target at ``(x_{n-1}, τ_{n-1})`` both jump to a level
  ``s = τ_{j-1}`` (``s = 0`` for ``j = 0``) with ``j`` uniform in a window below ``n - 1``, so ``s <= τ_{n-2}``: always
  a real jump, never the identity. Two windows (:data:`S_WINDOWS`):

  - ``official`` (what the released LoRAs were trained with): ``j ~ U{max(0, n-R), …, n-1}``, ``R = ceil(50 η rr)``,
    a fixed width in grid steps, so late in a trajectory ``s`` reaches 0;
  - ``paper`` (the paper's lower-bound ratio γ, best at 0.7 in its ablation): every grid level with
    ``γ·τ_n <= s <= τ_{n-2}`` (and ``s = 0`` only when γ = 0); when no level qualifies (small n) the window is the
    single level ``τ_{n-2}``, the nearest one below the teacher's next level;
* the loss is the pseudo-Huber distance (c = 1e-3) between the two jumps, with no c_skip/c_out: the DDIM-jump
  parameterisation the STD sampler of this project runs.

Tensors are VP latents (``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``); ``index`` tensors hold grid indices per sample.
"""

from __future__ import annotations

import math

import torch

from comfyui_std.core.errors import STDInputError, check_range
from comfyui_std.core.plan import ORIGIN_STEPS, origin_grid, trained_start_index
from comfyui_std.core.schedules import DiscreteSchedule
from comfyui_std.core.vp import add_noise, guidance

LAST_INDEX = 1  # trajectories retire once the advanced index reaches this (the last trained state is n = 2)
S_WINDOWS = ("official", "paper")


class DDIMGrid:
    """The DDIM grid with the schedule's ᾱ at each level (and at t = 0 for the final jump)."""

    def __init__(self, schedule: DiscreteSchedule | None = None, origin_steps: int = ORIGIN_STEPS):
        self.schedule = schedule or DiscreteSchedule()
        self.origin_steps = origin_steps
        self.timesteps = torch.tensor(origin_grid(origin_steps, self.schedule.num_train_timesteps))
        acp = self.schedule.alphas_cumprod
        self.alphas = acp[self.timesteps]
        # ᾱ of the level *below* grid index j: t = τ_{j-1}, and t = 0 for j = 0 (LCM's "alphas_cumprod_prev")
        self.alphas_prev = torch.cat([acp[:1], acp[self.timesteps[:-1]]])

    def timestep(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(index.device)[index]

    def alpha(self, index: torch.Tensor) -> torch.Tensor:
        return self.alphas.to(index.device)[index]

    def alpha_prev(self, index: torch.Tensor) -> torch.Tensor:
        return self.alphas_prev.to(index.device)[index]


def start_index(start_strength: float, origin_steps: int = ORIGIN_STEPS) -> int:
    n0 = trained_start_index(start_strength, origin_steps)
    if n0 <= LAST_INDEX + 1:
        raise STDInputError("start_strength", f"{start_strength} starts at grid index {n0}; STD needs at least "
                            f"{LAST_INDEX + 2} (start_strength > {(LAST_INDEX + 1) / origin_steps:g})")
    return n0


def window_size(start_strength: float, range_rate: float, origin_steps: int = ORIGIN_STEPS) -> int:
    """R = ceil(50 η rr): how far below the current index the target level s may lie (i2i rr 0.5, v2v rr 0.3)."""
    check_range("range_rate", range_rate, 0.0, 1.0, low_open=True)
    return max(1, math.ceil(origin_steps * start_strength * range_rate - 1e-9))


def jump(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """DDIM jump J(x̂0, ε̂; s) = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s) ε̂ (:func:`comfyui_std.core.vp.add_noise`)."""
    return add_noise(x0, eps, alpha)


def cfg_lcm(cond: tuple[torch.Tensor, torch.Tensor], uncond: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor):
    """LCM-form guidance on (x̂0, ε̂): ``c + w (c - u)`` (Imagen scale 1 + w), one w per sample."""
    (x0c, ec), (x0u, eu) = cond, uncond
    return guidance(x0u, x0c, 1 + w), guidance(eu, ec, 1 + w)


def target_bounds(index: torch.Tensor, window: int, mode: str = "official", gamma: float = 0.7,
                  grid: DDIMGrid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive bounds ``(low, high)`` of the target index j per sample (the target level is ``s = τ_{j-1}``)."""
    high = index - 1
    if mode == "official":
        low = (index - window).clamp(min=0)
    elif mode == "paper":
        check_range("s_gamma", gamma, 0.0, 1.0, high_open=True)
        grid = grid or DDIMGrid()
        t_n = grid.timestep(index).double()
        if gamma == 0:
            low = torch.zeros_like(index)
        else:  # smallest j >= 1 with τ_{j-1} >= γ τ_n
            levels = grid.timesteps.to(index.device).double()
            low = torch.searchsorted(levels, (gamma * t_n).contiguous(), right=False) + 1
        low = torch.minimum(low, high)
    else:
        raise STDInputError("s_window", f"got {mode!r}, choose one of {', '.join(S_WINDOWS)}")
    return low, high


def draw_target_index(index: torch.Tensor, window: int, generator: torch.Generator | None = None,
                      mode: str = "official", gamma: float = 0.7, grid: DDIMGrid | None = None) -> torch.Tensor:
    """j uniform in :func:`target_bounds` per sample; the target level is ``s = τ_{j-1}`` (``alpha_prev(j)``)."""
    low, high = target_bounds(index, window, mode, gamma, grid)
    span = (high - low + 1).clamp(min=1)
    u = torch.rand(index.shape, generator=generator, device="cpu").to(index.device)
    return low + (u * span).floor().long().clamp(max=span - 1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c), in float32."""
    d = a.float() - b.float()
    return (torch.sqrt(d * d + c * c) - c).mean()
