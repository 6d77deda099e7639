"""STD sampling nodes: STDSampler, STDSchedule and the all-in-one STDStylize.

Node ids are stable forever; inputs may be added with defaults, never renamed.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..core.plan import check_gamma
from .comfy_glue import sample_std_chunks, std_ksampler
from .common import (CATEGORY_SAMPLING, gamma_input, nfe_input, plan_input, plan_ui, prepare_run,
                     start_strength_input, stylize_inputs, user_errors)


class STDSampler(io.ComfyNode):
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced running STD/TCD consistency steps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDSampler",
            display_name="STD Sampler",
            category=CATEGORY_SAMPLING,
            description="STD/TCD multistep consistency sampler for SamplerCustom and SamplerCustomAdvanced. "
                        "Pair it with STD Schedule.",
            inputs=[gamma_input()],
            outputs=[io.Sampler.Output(tooltip="Use with SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    @user_errors
    def execute(cls, gamma=0.0) -> io.NodeOutput:
        return io.NodeOutput(std_ksampler(check_gamma(gamma)))


class STDSchedule(io.ComfyNode):
    """SIGMAS of the STD plan, read from the model's own model_sampling."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDSchedule",
            display_name="STD Schedule",
            category=CATEGORY_SAMPLING,
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
    @user_errors
    def execute(cls, model, nfe=8, start_strength=0.75, plan="official") -> io.NodeOutput:
        p, sigmas, _ = prepare_run(model, nfe, start_strength, plan)
        return io.NodeOutput(sigmas, ui=plan_ui(p))


class STDStylize(io.ComfyNode):
    """All-in-one STD image-to-image: noise the latent at the plan's first sigma and run the STD sampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDStylize",
            display_name="STD Stylize",
            category=CATEGORY_SAMPLING,
            description="Few-step STD style transfer: the input latent is noised to start_strength η and denoised "
                        "in nfe STD steps. Load an STD LoRA (matching η) on the model first. Honours an "
                        "inpainting mask (Set Latent Noise Mask) and ControlNets on the conditioning.",
            inputs=[*stylize_inputs("Base model with the STD LoRA (and optionally a style reference) applied.",
                                    "The content image, VAE-encoded (with a noise mask to repaint only a region)."),
                    plan_input()],
            outputs=[io.Latent.Output(tooltip="Stylized latent; decode with the same VAE.")],
        )

    @classmethod
    @user_errors
    def execute(cls, model, positive, negative, latent_image, seed, nfe=8, start_strength=0.75, gamma=0.0, cfg=6.0,
                plan="official") -> io.NodeOutput:
        gamma = check_gamma(gamma)
        p, sigmas, samples = prepare_run(model, nfe, start_strength, plan, latent_image)
        out = sample_std_chunks(model, positive, negative, latent_image, samples, sigmas, seed, gamma, cfg,
                                batch_index=latent_image.get("batch_index"))
        return io.NodeOutput(out, ui=plan_ui(p))


NODES = [STDSampler, STDSchedule, STDStylize]
