"""One-step text-to-image with a SiD-LSG generator LoRA: SiDOneStep (all in one) and SiDSchedule (SIGMAS).

A SiD-LSG generator is the UNet evaluated once at t_init (625 by default) on pure noise scaled to that level; its
x0 prediction is the image. In k-diffusion terms that is one deterministic step over the sigmas [σ(t_init), 0] from
noise at σ(t_init), so the same generator also runs in SamplerCustom with SiDSchedule + STD Sampler (gamma 0).
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import torch
from comfy_api.latest import io

from ..core import STDInputError, check_range
from .comfy_glue import check_model_sampling, sample_std_chunks
from .common import CATEGORY_SID, user_errors

log = logging.getLogger("comfyui_std")
T_INIT_TIP = ("Timestep the generator was distilled at (SiD-LSG default 625, i.e. sigma ≈ 2.5). STD LoRA Loader "
              "outputs the value stored in the LoRA.")


def onestep_sigmas(model, t_init: int) -> torch.Tensor:
    t_init = check_range("t_init", t_init, 1, 999, kind=int)
    ms = check_model_sampling(model)
    return torch.stack([ms.sigma(torch.tensor(float(t_init))).reshape(()).float(), torch.tensor(0.0)])


class SiDSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SiDSchedule",
            display_name="SiD One-Step Schedule",
            category=CATEGORY_SID,
            description="SIGMAS [σ(t_init), 0] for a SiD-LSG one-step generator: use with SamplerCustom (add_noise on, "
                        "an empty latent) and STD Sampler at gamma 0, cfg 1.",
            inputs=[io.Model.Input("model", tooltip="The base model with the SiD-LSG generator LoRA."),
                    io.Int.Input("t_init", default=625, min=1, max=999, tooltip=T_INIT_TIP)],
            outputs=[io.Sigmas.Output(tooltip="Two noise levels: σ(t_init) and 0.")],
        )

    @classmethod
    @user_errors
    def execute(cls, model, t_init=625) -> io.NodeOutput:
        sigmas = onestep_sigmas(model, t_init)
        return io.NodeOutput(sigmas, ui={"text": [f"one step from t_init {t_init} (sigma {float(sigmas[0]):.4f})"]})


class SiDOneStep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SiDOneStep",
            display_name="SiD One-Step Generate",
            category=CATEGORY_SID,
            description="Text-to-image in one network evaluation with a SiD-LSG generator LoRA (data-free "
                        "distillation with long and short guidance). Guidance is distilled in: no negative prompt.",
            inputs=[
                io.Model.Input("model", tooltip="The base model with the SiD-LSG generator LoRA applied."),
                io.Conditioning.Input("positive", tooltip="The prompt (CLIP Text Encode)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise."),
                io.Int.Input("t_init", default=625, min=1, max=999, tooltip=T_INIT_TIP),
            ],
            outputs=[io.Latent.Output(tooltip="Generated latents; decode with the model's VAE.")],
        )

    @classmethod
    @user_errors
    def execute(cls, model, positive, width=512, height=512, batch_size=1, seed=0, t_init=625) -> io.NodeOutput:
        sigmas = onestep_sigmas(model, t_init)
        for name, value in (("width", width), ("height", height)):
            if check_range(name, value, 64, 4096, kind=int) % 8:
                raise STDInputError(name, f"got {value}, must be a multiple of 8 (the latent is 8x smaller)")
        check_range("batch_size", batch_size, 1, 64, kind=int)
        latent_format = model.get_model_object("latent_format")
        samples = torch.zeros([batch_size, latent_format.latent_channels, height // 8, width // 8],
                              device=comfy.model_management.intermediate_device())
        out = sample_std_chunks(model, positive, positive, {"samples": samples}, samples, sigmas, seed, 0.0, 1.0)
        return io.NodeOutput(out, ui={"text": [f"SiD one step at t_init {t_init}, {batch_size} x {width}x{height}"]})


NODES = [SiDSchedule, SiDOneStep]
