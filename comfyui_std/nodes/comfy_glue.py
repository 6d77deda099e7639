"""Small adapters between the pure-torch core and ComfyUI's sampling objects.

Only imported inside ComfyUI (it imports ``comfy``).
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_sampling as cms
import comfy.samplers

from ..core import STDInputError, default_noise_sampler, sample_lcm, sample_onestep, sample_std


def _with_interrupt(callback):
    """Check ComfyUI's interrupt flag on every step, whoever drives the progress bar."""

    def cb(d):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(d)

    return cb


def _schedule_of(model):
    """The (possibly patched) model_sampling of the BaseModel behind KSAMPLER's model wrapper."""
    inner = getattr(getattr(model, "inner_model", None), "inner_model", None)
    return getattr(inner, "model_sampling", None)


def comfy_sample_std(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.0, shared_noise=False):
    """STD sampler for KSAMPLER. ``shared_noise``: the per-step noise (gamma > 0) is the same for every batch entry,
    which keeps the frames of a video consistent."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = None
    if gamma > 0 and shared_noise:
        one = default_noise_sampler(x[:1], extra_args.get("seed"))
        noise_sampler = lambda s, sn: one(s, sn).expand_as(x)  # noqa: E731
    elif gamma > 0:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    return sample_std(model, x, sigmas, extra_args=extra_args, callback=_with_interrupt(callback), disable=disable,
                      noise_sampler=noise_sampler, gamma=gamma, schedule=_schedule_of(model))


def comfy_sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_lcm(model, x, sigmas, extra_args=extra_args, callback=_with_interrupt(callback), disable=disable)


def comfy_sample_onestep(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_onestep(model, x, sigmas, extra_args=extra_args, callback=_with_interrupt(callback), disable=disable)


def std_ksampler(gamma: float, shared_noise: bool = False) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(comfy_sample_std, extra_options={"gamma": float(gamma), "shared_noise": shared_noise})


def describe_model_sampling(ms) -> str:
    pred = [c.__name__ for c in type(ms).__mro__ if c.__module__ == cms.__name__ and c.__name__.isupper()]
    return f"{type(ms).__name__}" + (f" ({pred[0]})" if pred else "")


def check_model_sampling(model, input_name: str = "model"):
    """Return the model's model_sampling if STD can run on it, else raise a clear STDInputError.

    STD needs a discrete 1000-step eps- or v-prediction schedule (SD1.x, SD2.x, SDXL and their fine-tunes).
    """
    ms = model.get_model_object("model_sampling")
    desc = describe_model_sampling(ms)
    flow_types = tuple(getattr(cms, n) for n in ("CONST", "ModelSamplingDiscreteFlow", "ModelSamplingFlux", "COSMOS_RFLOW")
                       if hasattr(cms, n))
    if isinstance(ms, flow_types):
        raise STDInputError(input_name, f"this is a flow-matching model ({desc}); STD runs on discrete-time "
                                        "eps/v-prediction models such as SD1.5 and SDXL")
    excluded = tuple(getattr(cms, n) for n in ("ModelSamplingDiscreteEDM", "StableCascadeSampling", "EDM", "X0")
                     if hasattr(cms, n))
    if not isinstance(ms, cms.ModelSamplingDiscrete) or not isinstance(ms, cms.EPS) or isinstance(ms, excluded):
        raise STDInputError(input_name, f"unsupported model type ({desc}); STD runs on discrete-time eps/v-prediction "
                                        "models such as SD1.5 and SDXL")
    n = len(ms.sigmas)
    if n != 1000:
        raise STDInputError(input_name, f"the model's schedule has {n} timesteps, STD needs the 1000-step schedule "
                                        "(remove a ModelSamplingDiscrete 'lcm' patch or similar before the STD nodes)")
    return ms


def check_latent(model, latent, input_name: str = "latent_image"):
    """Validate a LATENT dict against the model; returns its samples with empty-latent channels fixed."""
    import comfy.sample

    if not isinstance(latent, dict) or "samples" not in latent:
        raise STDInputError(input_name, "expected a LATENT (a dict with 'samples')")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise STDInputError(input_name, f"expected an image latent [batch, channels, height, width], got shape "
                                        f"{list(samples.shape)}")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        raise STDInputError(input_name, f"latent has {samples.shape[1]} channels but this model uses {channels}; "
                                        "encode the image with this model's VAE")
    if samples.shape[0] < 1 or samples.shape[2] < 1 or samples.shape[3] < 1:
        raise STDInputError(input_name, f"empty latent of shape {list(samples.shape)}")
    return samples
