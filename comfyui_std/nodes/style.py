"""Style reference: an IP-Adapter applied only to the style block (InstantStyle), our own implementation.

``STDIPAdapterLoader`` reads a standard IP-Adapter file from models/ipadapter (cached), ``STDStyleReference`` clones
the MODEL and installs attn2 replace patches on the layers a preset selects. The patches only add an image-prompt
attention term to the normal cross-attention, so the patched MODEL runs with every sampler, ours included, and stacks
with other attn2 replace patches (the previous patch computes the base term).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..core.errors import STDInputError
from ..core.style_blocks import (PRESET_NAMES, IPAdapterWeights, architecture_for_context_dim, check_adapter_fits,
                                 comfy_patch_key, image_prompt_tokens, ip_layer_order, nest_ip_adapter,
                                 parse_ip_adapter, selects, target_blocks)
from .comfy_compat import OWN_CHECK
from .common import CATEGORY_LOADERS, CATEGORY_STYLE, user_errors

log = logging.getLogger("comfyui_std")

# models/ipadapter is not a core ComfyUI folder: register it (keeping paths from extra_model_paths.yaml).
if "ipadapter" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["ipadapter"] = ([os.path.join(folder_paths.models_dir, "ipadapter")],
                                                       folder_paths.supported_pt_extensions)

IPAdapterType = io.Custom("IPADAPTER")  # payload: {"image_proj": {...}, "ip_adapter": {...}} (IPAdapter_plus' layout)

_CACHE: "OrderedDict[tuple, dict]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2


def load_ip_adapter_file(name: str) -> dict:
    """The IP-Adapter state dict of a file in models/ipadapter, as {"image_proj": ..., "ip_adapter": ...}.

    Files are cached by path, size and modification time (two at most), so re-running a graph or switching
    between two adapters does not read them again.
    """
    path = folder_paths.get_full_path("ipadapter", name) if name else None
    if not path:
        raise ValueError(f"ipadapter_file: '{name}' was not found in the models/ipadapter folder")
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as err:  # safetensors/pickle raise many types for corrupt files
        raise ValueError(f"ipadapter_file: could not read '{name}' ({type(err).__name__}: {err})") from None
    try:
        out = nest_ip_adapter(sd or {})
        parse_ip_adapter(out)
    except STDInputError as err:
        raise ValueError(f"ipadapter_file: '{name}': {str(err).split(': ', 1)[1]}") from None
    with _CACHE_LOCK:
        _CACHE[key] = out
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return out


def model_cross_attention(model) -> list[tuple[str, tuple[str, int, int], int]]:
    """(diffusers name, ComfyUI patch key, inner width) of every cross-attention layer, in IP-Adapter order."""
    unet_config = model.model.model_config.unet_config
    diffusion_model = model.model.diffusion_model
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    suffix = ".attn2.to_k.weight"
    found = {}
    for dkey, ckey in mapping.items():
        if dkey.endswith(suffix):
            found[dkey[: -len(".to_k.weight")]] = ckey[: -len(".to_k.weight")]
    layers = []
    for dname in ip_layer_order(found):
        cname = found[dname]
        try:
            attn = diffusion_model.get_submodule(cname)
        except AttributeError:
            continue
        layers.append((dname, comfy_patch_key(cname), int(attn.to_k.out_features)))
    return layers


class IPAttentionPatch:
    """attn2 replace patch: base cross-attention (or the previous patch) + Σ weight · attention(q, image tokens)."""

    def __init__(self, previous, terms: tuple):
        self.previous = previous
        self.terms = terms  # each: (to_k, to_v, cond, uncond, weight, sigma_start, sigma_end)
        self._moved: dict = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; this object is immutable
        return self

    def with_term(self, term) -> "IPAttentionPatch":
        return IPAttentionPatch(self.previous, self.terms + (term,))

    def _on(self, i, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (i, id(t), like.device, like.dtype)
        hit = self._moved.get(key)
        if hit is None:
            hit = self._moved[key] = t.to(device=like.device, dtype=like.dtype)
        return hit

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=precision)
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.detach().flatten()[0]) if isinstance(sigmas, torch.Tensor) else None
        chunks = extra_options.get("cond_or_uncond") or [0]
        for i, (to_k, to_v, cond, uncond, weight, s_start, s_end) in enumerate(self.terms):
            if weight == 0 or (sigma is not None and not (s_end <= sigma <= s_start)):
                continue
            per = q.shape[0] // len(chunks)
            tokens = torch.cat([(uncond if c == 1 else cond).expand(per, -1, -1) for c in chunks])
            tokens = tokens.to(device=q.device, dtype=q.dtype)
            k_ip = F.linear(tokens, self._on(i, to_k, q))
            v_ip = F.linear(tokens, self._on(i, to_v, q))
            out = out + weight * optimized_attention(q, k_ip, v_ip, heads, attn_precision=precision)
        return out


def resolve_style_layers(model, ipadapter: dict, preset: str):
    """Validate the adapter against the model and pick the preset's layers (before any image is encoded).

    Returns (weights, all layers, chosen [(layer index, patch key)], architecture)."""
    w: IPAdapterWeights = parse_ip_adapter(ipadapter)
    context_dim = int(model.model.model_config.unet_config.get("context_dim") or 0)
    layers = model_cross_attention(model)
    check_adapter_fits(w, context_dim, [inner for _, _, inner in layers], "this model")
    arch = architecture_for_context_dim(context_dim)
    prefixes = target_blocks(preset, arch)
    chosen = [(i, key) for i, (dname, key, _) in enumerate(layers) if selects(dname, prefixes)]
    if not chosen:
        raise ValueError(f"preset: '{preset}' selects no cross-attention layer of this {arch.upper()} model "
                         f"(blocks {', '.join(prefixes)}); try 'all blocks'")
    return w, layers, chosen, arch


def apply_style_reference(model, ipadapter: dict, image_embeds: torch.Tensor, weight: float, preset: str,
                          start_percent: float, end_percent: float):
    """Clone ``model`` and install the style patches. Returns (patched model, report string)."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent/end_percent: need 0 <= start ({start_percent}) <= end ({end_percent}) <= 1")
    w, layers, chosen, arch = resolve_style_layers(model, ipadapter, preset)
    cond, uncond = image_prompt_tokens(w, image_embeds)
    ms = model.get_model_object("model_sampling")
    s_start, s_end = float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))
    patched = model.clone()
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for i, key in chosen:
        term = (w.to_k[i], w.to_v[i], cond, uncond, float(weight), s_start, s_end)
        prev = replace.get(key)
        patch = prev.with_term(term) if isinstance(prev, IPAttentionPatch) else IPAttentionPatch(prev, (term,))
        patched.set_model_attn2_replace(patch, *key)
    blocks = sorted({(b, n) for _, (b, n, _) in chosen})
    report = (f"STD style reference: {w.describe()}; preset '{preset}' ({arch.upper()}) patches {len(chosen)} of "
              f"{len(layers)} cross-attention layers in {', '.join(f'{b}.{n}' for b, n in blocks)}; weight {weight}")
    return patched, report


def encode_style_images(clip_vision, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4) or image.shape[0] < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected an IMAGE batch [N,H,W,3], got {shape}")
    comfy.model_management.throw_exception_if_processing_interrupted()
    out = clip_vision.encode_image(image, crop=True)
    embeds = getattr(out, "image_embeds", None)
    if embeds is None:
        raise ValueError("clip_vision: this CLIP vision model gives no projected image embeddings; standard "
                         "IP-Adapters need a CLIP ViT (CLIP-ViT-H-14 for ip-adapter_sdxl_vit-h)")
    return embeds


class STDIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDIPAdapterLoader",
            display_name="STD IP-Adapter Loader",
            category=CATEGORY_LOADERS,
            description="Loads a standard IP-Adapter (image_proj + ip_adapter layout, e.g. "
                        "ip-adapter_sdxl_vit-h.safetensors) from models/ipadapter. Weights are cached.",
            inputs=[io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list("ipadapter"),
                                   tooltip="An IP-Adapter in models/ipadapter (.safetensors or .bin).")],
            outputs=[IPAdapterType.Output(display_name="IPADAPTER")],
        )

    @classmethod
    def validate_inputs(cls, ipadapter_file):
        """ComfyUI leaves ``ipadapter_file`` to this node, which checks it when it runs (see comfy_compat)."""
        return OWN_CHECK

    @classmethod
    @user_errors
    def execute(cls, ipadapter_file) -> io.NodeOutput:
        sd = load_ip_adapter_file(ipadapter_file)
        return io.NodeOutput(sd, ui={"text": [f"{ipadapter_file}: {parse_ip_adapter(sd).describe()}"]})


class STDStyleReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDStyleReference",
            display_name="STD Style Reference",
            category=CATEGORY_STYLE,
            description="Conditions the model on a style image through an IP-Adapter on the style block only "
                        "(InstantStyle; what STD's official inference does). Returns a patched copy of the MODEL "
                        "that works with every sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to condition (SDXL or SD1.5, with or without an STD LoRA); "
                                                "a patched copy is returned."),
                IPAdapterType.Input("ipadapter", tooltip="From STD IP-Adapter Loader (or IPAdapter_plus' loader)."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder the adapter was trained with "
                                    "(CLIP-ViT-H-14 for ip-adapter_sdxl_vit-h), from Load CLIP Vision."),
                io.Image.Input("image", tooltip="Style reference; several images are averaged."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.01,
                               tooltip="Strength of the style term (STD uses 1.0)."),
                io.Combo.Input("preset", options=list(PRESET_NAMES), default="style",
                               tooltip="Which blocks receive the style. style: SDXL up_blocks.0.attentions.1 "
                                       "(ComfyUI output 1), SD1.5 up_blocks.1 (output 3-5); layout: SDXL "
                                       "down_blocks.2.attentions.1 (input 8), SD1.5 down_blocks.2 (input 7-8)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in the full noise schedule the style starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in the full noise schedule the style stops acting."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    @user_errors
    def execute(cls, model, ipadapter, clip_vision, image, weight=1.0, preset="style", start_percent=0.0,
                end_percent=1.0) -> io.NodeOutput:
        if not isinstance(ipadapter, dict):
            raise ValueError(f"ipadapter: expected an IPADAPTER from an IP-Adapter loader, got "
                             f"{type(ipadapter).__name__}")
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent/end_percent: need 0 <= start ({start_percent}) <= end "
                             f"({end_percent}) <= 1")
        resolve_style_layers(model, ipadapter, preset)  # fail fast, before the image encoder runs
        embeds = encode_style_images(clip_vision, image)
        patched, report = apply_style_reference(model, ipadapter, embeds, weight, preset, start_percent, end_percent)
        log.info(report)
        return io.NodeOutput(patched, ui={"text": [report]})


NODES = [STDIPAdapterLoader, STDStyleReference]
