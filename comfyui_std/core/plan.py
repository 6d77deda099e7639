"""The STD timestep plan: (nfe, start_strength) -> the training timesteps the sampler visits.

STD students are distilled on the 50-step DDIM grid ``{19, 39, ..., 999}`` of a 1000-step schedule, starting from
a partially noised input at start strength eta (η). Two plans are offered:

``official`` (default)
    Exactly what the official STD inference visits: diffusers ``StableDiffusionXLImg2ImgPipeline`` with
    ``TCDScheduler`` (original_inference_steps 50) and ``strength=η``. The pipeline schedules ``N`` TCD steps on the
    50-step grid and keeps the last ``int(N * η)``; to run exactly ``nfe`` steps, ``N`` is the smallest count with
    ``int(N * η) == nfe`` (``ceil(nfe / η)`` in exact arithmetic). nfe 8, η 0.75 gives N = 11 and
    739, 639, 559, 459, 379, 279, 199, 99.

``trained_start``
    Starts where the released LoRAs were trained to start, grid index ``ceil(50 η)`` (679/779/879/979 for
    η 0.65/0.75/0.85/0.95), and spaces ``nfe`` steps evenly on the grid below it, TCD-style.

The same function serves the ComfyUI nodes, the Gradio app and the trainer, so the same settings give the same
timesteps everywhere. The *teacher's* many-step plan from a student's start (:func:`teacher_plan`) is one function
too: the app's Compare tab and the trainer's preview grids visit the same teacher timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import STDInputError, check_range

PLANS = ("official", "trained_start")
ORIGIN_STEPS = 50
NUM_TRAIN_TIMESTEPS = 1000


def origin_grid(origin_steps: int = ORIGIN_STEPS, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The DDIM grid, ascending: ``[k-1, 2k-1, ..., T-1]`` with ``k = T // origin_steps``."""
    k = num_train_timesteps // origin_steps
    return [k * (i + 1) - 1 for i in range(origin_steps)]


def check_start_strength(start_strength) -> float:
    return check_range("start_strength", start_strength, 0.0, 1.0, low_open=True)


def check_nfe(nfe) -> int:
    return check_range("nfe", nfe, 1, ORIGIN_STEPS, kind=int)


def check_gamma(gamma) -> float:
    return check_range("gamma", gamma, 0.0, 1.0)


def trained_start_index(start_strength: float, origin_steps: int = ORIGIN_STEPS) -> int:
    """Grid index a student trained at strength η starts from: ``ceil(origin_steps * η)``, at most origin_steps-1.

    A tolerance of 1e-9 keeps float noise (50 * 0.6 = 30.000000000000004) from moving the index up.
    """
    eta = check_start_strength(start_strength)
    return min(math.ceil(origin_steps * eta - 1e-9), origin_steps - 1)


def official_inference_steps(nfe: int, start_strength: float, origin_steps: int = ORIGIN_STEPS) -> int:
    """The diffusers ``num_inference_steps`` N that makes img2img at strength η run exactly ``nfe`` steps.

    Mirrors the pipeline's own float arithmetic ``int(N * strength)``; the first N reaching nfe gives exactly nfe,
    since the count grows by at most one per N when η <= 1.
    """
    nfe, eta = check_nfe(nfe), check_start_strength(start_strength)
    n = max(nfe, math.ceil(nfe / eta) - 1)
    while int(n * eta) < nfe:
        n += 1
    if n > origin_steps:
        raise STDInputError(
            "nfe", f"nfe {nfe} at start_strength {eta:g} needs {n} scheduler steps, more than the {origin_steps}-step grid "
            f"holds; the most at this start_strength is {max_nfe(eta, 'official', origin_steps)}")
    return n


def max_nfe(start_strength: float, plan: str = "official", origin_steps: int = ORIGIN_STEPS) -> int:
    """Largest nfe a plan can run at this start strength."""
    eta = check_start_strength(start_strength)
    if plan == "trained_start":
        return trained_start_index(eta, origin_steps) + 1
    return int(origin_steps * eta)


@dataclass(frozen=True)
class STDPlan:
    """The timesteps an STD run visits (descending), and how they were chosen."""

    timesteps: tuple[int, ...]
    nfe: int
    start_strength: float
    plan: str
    scheduler_steps: int | None = None  # N of the official plan (diffusers num_inference_steps)

    @property
    def start_timestep(self) -> int:
        return self.timesteps[0]

    def sigmas(self, schedule, final_sigma: float = 0.0) -> torch.Tensor:
        """Noise levels for a k-diffusion sampler: ``schedule.sigma(t)`` for every timestep, then ``final_sigma``.

        ``schedule`` is a :class:`~.schedules.DiscreteSchedule` or a ComfyUI ``model_sampling`` object.
        """
        ts = torch.tensor(self.timesteps, dtype=torch.float32)
        sig = schedule.sigma(ts).float().cpu()
        return torch.cat([sig, torch.tensor([float(final_sigma)])])

    def describe(self) -> str:
        steps = ", ".join(str(t) for t in self.timesteps)
        extra = f", diffusers num_inference_steps {self.scheduler_steps}" if self.scheduler_steps else ""
        return (f"STD {self.plan} plan: NFE {self.nfe}, start_strength {self.start_strength:g}, "
                f"start timestep {self.start_timestep}{extra}; timesteps {steps}")


def std_plan(nfe: int, start_strength: float, plan: str = "official", origin_steps: int = ORIGIN_STEPS,
             num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> STDPlan:
    """Compute the STD timestep plan.

    Args:
        nfe: number of sampler steps (network evaluations per CFG branch), 1..50.
        start_strength: η in (0, 1], the fraction of the schedule the input is noised to.
        plan: ``"official"`` or ``"trained_start"`` (see module docstring).

    Raises:
        STDInputError: for out-of-range values or an nfe the 50-step grid cannot hold at this η.
    """
    if plan not in PLANS:
        raise STDInputError("plan", f"got {plan!r}, choose one of {', '.join(PLANS)}")
    nfe, eta = check_nfe(nfe), check_start_strength(start_strength)
    grid = origin_grid(origin_steps, num_train_timesteps)  # ascending
    if plan == "official":
        n = official_inference_steps(nfe, eta, origin_steps)
        rev = grid[::-1]
        # diffusers TCDScheduler: floor(linspace(0, origin_steps, n, endpoint=False)) indexes the reversed grid.
        idx = torch.floor(torch.arange(n, dtype=torch.float64) * (origin_steps / n)).long().tolist()
        full = [rev[i] for i in idx]
        t_start = n - min(int(n * eta), n)  # img2img get_timesteps
        ts = tuple(full[t_start:])
        return STDPlan(ts, nfe, eta, plan, n)
    n0 = trained_start_index(eta, origin_steps)
    if nfe > n0 + 1:
        raise STDInputError(
            "nfe", f"nfe {nfe} at start_strength {eta:g} with the trained_start plan needs more grid points than the "
            f"{n0 + 1} below the start timestep {grid[n0]}; the most is {n0 + 1}")
    idx = torch.floor(torch.arange(nfe, dtype=torch.float64) * ((n0 + 1) / nfe)).long().tolist()
    ts = tuple(grid[n0 - i] for i in idx)
    return STDPlan(ts, nfe, eta, plan, None)


def teacher_plan(start_timestep: int, steps: int, start_strength: float = 1.0, origin_steps: int = ORIGIN_STEPS,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> STDPlan:
    """The teacher's many-step DDIM plan from a student's start timestep: ``steps`` levels of the 50-step grid at or
    below ``start_timestep``, the first one the start itself, spaced like the ``trained_start`` plan spaces the
    student's steps (level ``k`` is the ``floor(k * m / steps)``-th of the ``m`` grid levels counted down from the
    start). The base model without the LoRA runs it with gamma 0 (DDIM) as the reference a student is distilled
    towards: the app's Compare tab and the trainer's preview grids both use it.

    Raises:
        STDInputError: ``start_timestep`` is not a grid level, or ``steps`` is outside ``1..m``.
    """
    grid = origin_grid(origin_steps, num_train_timesteps)
    if start_timestep not in grid:
        raise STDInputError("start_timestep", f"{start_timestep} is not a level of the {origin_steps}-step grid")
    below = [t for t in reversed(grid) if t <= start_timestep]
    steps = check_range("teacher_steps", steps, 1, len(below), kind=int)
    idx = torch.floor(torch.arange(steps, dtype=torch.float64) * (len(below) / steps)).long().tolist()
    return STDPlan(tuple(below[i] for i in idx), steps, start_strength, "teacher")
