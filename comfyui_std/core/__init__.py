"""Pure-torch STD core: noise schedules, the STD timestep plan and the few-step samplers.

This package imports neither ComfyUI nor diffusers; the ComfyUI nodes, the Gradio app and the trainer all call it.
"""

from .errors import STDInputError, check_range
from .plan import PLANS, STDPlan, max_nfe, official_inference_steps, origin_grid, std_plan, trained_start_index
from .sampling import SAMPLERS, default_noise_sampler, sample_lcm, sample_onestep, sample_std
from .schedules import DiscreteSchedule, KDenoiser, denoised_from_output

__all__ = [
    "STDInputError", "check_range", "PLANS", "STDPlan", "max_nfe", "official_inference_steps", "origin_grid",
    "std_plan", "trained_start_index", "SAMPLERS", "default_noise_sampler", "sample_lcm", "sample_onestep",
    "sample_std", "DiscreteSchedule", "KDenoiser", "denoised_from_output",
]
