"""Adapters between the pure-torch core and ComfyUI's sampling objects.

Only imported inside ComfyUI (it imports ``comfy``). The nodes sample through ComfyUI's own stack
(``comfy.sample.sample_custom``: CFG guider, model patches, inpainting masks, ControlNets, previews, interrupts)
with the core's STD sampler, start noise, step noise and chunk loop (:mod:`comfyui_std.core.noise`, :mod:`comfyui_std.core.stylize`).
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_sampling as cms
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..core import STDInputError, sample_std
from ..core.tensors import check_tensor
from ..core.chunks import Chunking
from ..core.noise import check_noise_mode, step_noise_sampler
from ..core.stylize import frames_of, stylize_chunks


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


def comfy_sample_std(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.0, noise="per_frame"):
    """The core STD sampler as a KSAMPLER function. ``noise``: the per-step noise (gamma > 0) of the core's step
    noise policy, ``shared`` (the same for every batch entry: consistent video frames) or ``per_frame``."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = step_noise_sampler(x, extra_args.get("seed"), noise) if gamma > 0 else None
    return sample_std(model, x, sigmas, extra_args=extra_args, callback=_with_interrupt(callback), disable=disable,
                      noise_sampler=noise_sampler, gamma=gamma, schedule=_schedule_of(model))


def std_ksampler(gamma: float, noise: str = "per_frame") -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(comfy_sample_std, extra_options={"gamma": float(gamma),
                                                                    "noise": check_noise_mode(noise)})


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
    own = _own_sigmas(model)
    if own is not None and (own.shape != ms.sigmas.shape or
                            not torch.allclose(ms.sigmas.float().cpu(), own, rtol=1e-4, atol=1e-6)):
        raise STDInputError(input_name, "the model's noise schedule was replaced (by AnimateDiff-Evolved's "
                                        "beta_schedule or a ModelSamplingDiscrete patch): STD LoRAs are distilled on "
                                        "the base model's own schedule and the STD plan would run on the wrong one; "
                                        "set beta_schedule to 'use existing' or remove the patch")
    return ms


def _own_sigmas(model):
    """The sigmas of the checkpoint's own schedule (ComfyUI builds it from the model config), whatever object patch
    replaced ``model_sampling`` since; None for models that are not a ComfyUI BaseModel."""
    import comfy.model_base

    base = getattr(model, "model", None)
    config, model_type = getattr(base, "model_config", None), getattr(base, "model_type", None)
    if config is None or model_type is None:
        return None
    return comfy.model_base.model_sampling(config, model_type).sigmas.float().cpu()


def check_latent(model, latent, input_name: str = "latent_image"):
    """Validate a LATENT dict against the model; returns its samples with empty-latent channels fixed."""
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
    return check_tensor(input_name, samples, "latent")


def _control_for_frames(control, start: int, end: int, memo: dict):
    """A copy of a ControlNet chain whose hint images are the rows frames ``[start, end)`` use.

    ComfyUI broadcasts a hint batch to the sampled batch by truncating it, so a chunk of a video sampled alone
    would see the hints of the clip's first frames; each chunk gets its own frames' hints instead. ``memo`` keeps
    one copy per ControlNet, shared by the positive and negative conditioning as ComfyUI's Apply ControlNet does.
    """
    if control is None:
        return None
    if id(control) not in memo:
        c = control.copy()
        hint = getattr(control, "cond_hint_original", None)
        if isinstance(hint, torch.Tensor) and hint.ndim >= 1:
            c.cond_hint_original = frames_of(hint, start, end)
        memo[id(control)] = c.set_previous_controlnet(
            _control_for_frames(control.previous_controlnet, start, end, memo))
    return memo[id(control)]


def conditionings_for_frames(conditionings, start: int, end: int) -> list:
    """Each conditioning with its per-frame parts (ControlNet hints) cut to frames ``[start, end)``."""
    memo: dict = {}
    out = []
    for conditioning in conditionings:
        part = []
        for tensor, options in conditioning:
            if options.get("control") is not None:
                options = dict(options, control=_control_for_frames(options["control"], start, end, memo))
            part.append([tensor, options])
        out.append(part)
    return out


def sample_std_latents(model, positive, negative, latents, chunk_noise, sigmas, seed: int, gamma: float, cfg: float,
                       noise: str, start: int, end: int, *, mask=None, whole: bool = False):
    """Sample the clean latents of frames ``[start, end)`` of a clip through ComfyUI's stack (STD sampler, CFG
    guider, previews, interrupts), their start noise given; ControlNet hints are cut to those frames unless
    ``whole`` (the chunk is the whole batch). Used by the in-memory chunk loop and by the streamed file node."""
    pos, neg = (positive, negative) if whole else conditionings_for_frames((positive, negative), start, end)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1, {})
    return comfy.sample.sample_custom(
        model, chunk_noise, cfg, std_ksampler(gamma, noise), sigmas, pos, neg, latents, noise_mask=mask,
        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


def sample_std_chunks(model, positive, negative, latent: dict, samples, sigmas, seed: int, gamma: float, cfg: float,
                      chunking: Chunking = Chunking(None, noise="per_frame"), *, batch_index=None) -> dict:
    """Stylize ``samples`` through ComfyUI's sampling stack, chunk by chunk with the core's noise and cross-fades.

    The latent's ``noise_mask`` (SetLatentNoiseMask; inpainting) and ControlNet hints are sliced per chunk with
    ComfyUI's broadcast rule, so every frame is sampled with its own mask and hint. Returns the output LATENT.
    """
    n = samples.shape[0]
    mask = latent.get("noise_mask")
    if mask is not None:  # ComfyUI's own layout of a mask batch: [frames, 1, H, W]
        mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))

    def run_chunk(s, e, chunk_noise):
        whole = (s, e) == (0, n)
        return sample_std_latents(model, positive, negative, samples[s:e], chunk_noise, sigmas, seed, gamma, cfg,
                                  chunking.noise, s, e, mask=mask if whole else frames_of(mask, s, e), whole=whole)

    result = stylize_chunks(samples, seed, run_chunk, chunking, batch_index=batch_index)
    out = latent.copy()
    out["samples"] = result
    return out
