"""STD sampling nodes: STDSampler, STDSchedule and the all-in-one STDStylize.

Node ids are stable forever; inputs may be added with defaults, never renamed.
"""

from __future__ import annotations

import logging

import comfy.sample
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..core import PLANS, STDInputError, std_plan
from ..core.plan import check_gamma, check_nfe, check_start_strength
from .comfy_glue import check_latent, check_model_sampling, std_ksampler

log = logging.getLogger("comfyui_std")

CATEGORY = "STD"

NFE_TIP = ("Number of sampler steps (network evaluations per CFG branch). STD students are distilled for 4-8; "
           "the most at a given start_strength is limited by the 50-step grid.")
ETA_TIP = ("start_strength (η): how far into the noise schedule the input is pushed before sampling (0-1]. "
           "Use the η the STD LoRA was trained for (0.65/0.75/0.85/0.95): higher stylises more, lower keeps more content.")
GAMMA_TIP = ("Per-step stochasticity of the TCD/STD step (0 = deterministic DDIM-like steps, what the official STD "
             "inference runs; 1 = LCM-like full re-noising). Called 'eta' in diffusers' TCDScheduler.step.")
PLAN_TIP = ("official: the timesteps the official STD inference visits (diffusers img2img + TCD, "
            "num_inference_steps = ceil(nfe/η)). trained_start: start exactly at the timestep the LoRA was trained "
            "to start from (ceil(50η) on the 50-step grid) and space nfe steps below it.")


def _user_error(err: STDInputError) -> ValueError:
    """Re-raise core validation errors as plain ValueErrors with the same message (what ComfyUI shows)."""
    return ValueError(str(err))


def _plan_ui(plan) -> dict:
    return {"text": [plan.describe()]}


def nfe_input(default: int = 8) -> io.Int.Input:
    return io.Int.Input("nfe", default=default, min=1, max=50, tooltip=NFE_TIP)


def start_strength_input(default: float = 0.75) -> io.Float.Input:
    return io.Float.Input("start_strength", default=default, min=0.01, max=1.0, step=0.01, tooltip=ETA_TIP)


def gamma_input() -> io.Float.Input:
    return io.Float.Input("gamma", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=GAMMA_TIP)


def plan_input() -> io.Combo.Input:
    return io.Combo.Input("plan", options=list(PLANS), default="official", optional=True, tooltip=PLAN_TIP)


def stylize_inputs(model_tip: str, latent_tip: str) -> list:
    """The inputs STD Stylize and STD Stylize Video share, in widget order (before their own extras)."""
    return [
        io.Model.Input("model", tooltip=model_tip),
        io.Conditioning.Input("positive", tooltip="Prompt describing the target style."),
        io.Conditioning.Input("negative", tooltip="Negative prompt (used when cfg > 1)."),
        io.Latent.Input("latent_image", tooltip=latent_tip),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the noise added at the start timestep."),
        nfe_input(),
        start_strength_input(),
        gamma_input(),
        io.Float.Input("cfg", default=6.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale (the official STD demo uses 6; 1 disables the "
                               "negative branch and halves the cost)."),
    ]


def make_plan(nfe, start_strength, plan="official"):
    try:
        return std_plan(check_nfe(nfe), check_start_strength(start_strength), plan or "official")
    except STDInputError as err:
        raise _user_error(err) from None


class STDSampler(io.ComfyNode):
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced running STD/TCD consistency steps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDSampler",
            display_name="STD Sampler",
            category=CATEGORY,
            description="STD/TCD multistep consistency sampler for SamplerCustom and SamplerCustomAdvanced. "
                        "Pair it with STD Schedule.",
            inputs=[gamma_input()],
            outputs=[io.Sampler.Output(tooltip="Use with SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, gamma=0.0) -> io.NodeOutput:
        try:
            gamma = check_gamma(gamma)
        except STDInputError as err:
            raise _user_error(err) from None
        return io.NodeOutput(std_ksampler(gamma))


class STDSchedule(io.ComfyNode):
    """SIGMAS of the STD plan, read from the model's own model_sampling."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDSchedule",
            display_name="STD Schedule",
            category=CATEGORY,
            description="Noise levels for an STD run of nfe steps starting at start_strength η. Feed SamplerCustom "
                        "(add_noise on) with a clean latent: it adds the noise at the first sigma.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample (its own noise schedule is used)."),
                nfe_input(),
                start_strength_input(),
                plan_input(),
            ],
            outputs=[io.Sigmas.Output(tooltip="nfe + 1 noise levels, ending in 0.")],
        )

    @classmethod
    def execute(cls, model, nfe=8, start_strength=0.75, plan="official") -> io.NodeOutput:
        try:
            ms = check_model_sampling(model)
        except STDInputError as err:
            raise _user_error(err) from None
        p = make_plan(nfe, start_strength, plan)
        sigmas = p.sigmas(ms)
        log.info(p.describe())
        return io.NodeOutput(sigmas, ui=_plan_ui(p))


class STDStylize(io.ComfyNode):
    """All-in-one STD image-to-image: noise the latent at the plan's first sigma and run the STD sampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDStylize",
            display_name="STD Stylize",
            category=CATEGORY,
            description="Few-step STD style transfer: the input latent is noised to start_strength η and denoised "
                        "in nfe STD steps. Load an STD LoRA (matching η) on the model first.",
            inputs=[*stylize_inputs("Base model with the STD LoRA (and optionally a style reference) applied.",
                                    "The content image, VAE-encoded."), plan_input()],
            outputs=[io.Latent.Output(tooltip="Stylized latent; decode with the same VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, nfe=8, start_strength=0.75, gamma=0.0, cfg=6.0,
                plan="official") -> io.NodeOutput:
        try:
            ms = check_model_sampling(model)
            samples = check_latent(model, latent_image)
            gamma = check_gamma(gamma)
        except STDInputError as err:
            raise _user_error(err) from None
        p = make_plan(nfe, start_strength, plan)
        sigmas = p.sigmas(ms)
        log.info(p.describe())
        out = stylize_latent(model, positive, negative, latent_image, samples, seed, sigmas, gamma, cfg)
        return io.NodeOutput(out, ui=_plan_ui(p))


def stylize_latent(model, positive, negative, latent, samples, seed, sigmas, gamma, cfg, noise=None,
                   shared_step_noise=False):
    """Run the STD sampler through ComfyUI's sampling stack (CFG guider, progress bar, previews, interrupts)."""
    if noise is None:
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    x0_output = {}
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1, x0_output)
    result = comfy.sample.sample_custom(
        model, noise, cfg, std_ksampler(gamma, shared_step_noise), sigmas, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = result
    return out


NODES = [STDSampler, STDSchedule, STDStylize]
