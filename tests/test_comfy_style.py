"""STD Style Reference in the real ComfyUI host (COMFYUI_PATH): patches only the chosen blocks, weight 0 is a no-op,
adapters for other bases and mismatched CLIP vision models are rejected with clear messages."""

import os
import sys

import pytest
import torch

from tools import comfy_host


def _style_module(host):
    return sys.modules[host.M["STDStyleReference"].__module__]


def _adapter(host, name="tiny_ip_adapter.safetensors"):
    return host.M["STDIPAdapterLoader"].execute(name).result[0]


def _style_image(seed=1, n=1):
    return torch.rand(n, 48, 40, 3, generator=torch.Generator().manual_seed(seed))


def _apply(host, model, files, weight=1.0, preset="style", start=0.0, end=1.0, image=None, clip_vision=None):
    with torch.inference_mode():
        return host.M["STDStyleReference"].execute(model, _adapter(host), clip_vision or files["clip_vision"],
                                                   _style_image() if image is None else image, weight, preset,
                                                   start, end).result[0]


def _attn2_keys(model):
    return set(model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}))


def _forward(model, sigma=5.0, hooks=None):
    """One UNet evaluation with the model's transformer options; returns the output and per-block activations."""
    dm = model.model.diffusion_model
    acts, handles = {}, []
    for name in hooks or ():  # ComfyUI runs a block's layers one by one: hook its last layer
        block = dm.get_submodule(name)
        handles.append(block[len(block) - 1].register_forward_hook(
            lambda m, i, o, name=name: acts.__setitem__(name, o.detach().clone())))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * sigma
    ctx = torch.randn(2, 77, 768, generator=g)
    to = dict(model.model_options.get("transformer_options", {}))
    to["sigmas"] = torch.full((2,), sigma)
    to["cond_or_uncond"] = [0, 1]
    try:
        with torch.inference_mode():
            out = model.model.apply_model(x, torch.full((2,), sigma), c_crossattn=ctx, transformer_options=to)
    finally:
        for h in handles:
            h.remove()
    return out, acts


# the tiny checkpoint is SD1.5-shaped with 3 levels: diffusers up_blocks.1 = ComfyUI output_blocks 2-3,
# down_blocks.2 = input_blocks.5 (one res block per level, no downsample after the last level)
EXPECTED_KEYS = {
    "style": {("output", 2, 0), ("output", 3, 0)},
    "layout": {("input", 5, 0)},
    "style+layout": {("output", 2, 0), ("output", 3, 0), ("input", 5, 0), ("middle", 0, 0)},
}


@pytest.mark.parametrize("preset", ["style", "layout", "style+layout", "all blocks"])
def test_preset_patches_only_its_blocks_and_never_mutates_the_input(host, tiny_models, style_files, preset):
    model = tiny_models[0]
    before = _attn2_keys(model)
    patched = _apply(host, model, style_files, preset=preset)
    assert _attn2_keys(model) == before == set()
    layers = _style_module(host).model_cross_attention(model)
    expected = EXPECTED_KEYS.get(preset, {key for _, key, _ in layers})
    assert _attn2_keys(patched) == expected
    assert len(layers) == 10  # 3 input + 1 middle + 6 output transformer blocks


def test_weight_zero_leaves_the_output_unchanged(host, tiny_models, style_files):
    model = tiny_models[0]
    base, _ = _forward(model)
    zero, _ = _forward(_apply(host, model, style_files, weight=0.0, preset="all blocks"))
    assert torch.equal(base, zero)


def test_style_changes_the_output_only_through_the_style_block(host, tiny_models, style_files):
    model = tiny_models[0]
    blocks = [f"input_blocks.{i}" for i in range(6)] + ["middle_block"] + [f"output_blocks.{i}" for i in range(6)]
    base, a0 = _forward(model, hooks=blocks)
    styled, a1 = _forward(_apply(host, model, style_files, weight=1.0, preset="style"), hooks=blocks)
    assert (styled - base).abs().max() > 1e-3
    unchanged = [b for b in blocks if torch.equal(a0[b], a1[b])]
    # everything before output_blocks.2 (the first style block) is bit-identical; it and all later blocks differ
    assert unchanged == blocks[:6] + ["middle_block", "output_blocks.0", "output_blocks.1"]


def test_start_end_percent_gate_the_style_by_sigma(host, tiny_models, style_files):
    model = tiny_models[0]
    ms = model.get_model_object("model_sampling")
    base, _ = _forward(model, sigma=0.5)
    late_only = _apply(host, model, style_files, start=0.0, end=0.2)  # only the noisiest 20% of the schedule
    assert 0.5 < ms.percent_to_sigma(0.0) and 0.5 < ms.percent_to_sigma(0.2)
    out, _ = _forward(late_only, sigma=0.5)
    assert torch.equal(out, base)
    high = float(ms.percent_to_sigma(0.1))
    base_hi, _ = _forward(model, sigma=high)
    out_hi, _ = _forward(late_only, sigma=high)
    assert not torch.equal(out_hi, base_hi)


def test_stacked_style_references_add_up(host, tiny_models, style_files):
    """Two nodes in series keep both terms (and any earlier attn2 patch): weights 0.3 + 0.5 == one node at 0.8."""
    model = tiny_models[0]
    twice = _apply(host, _apply(host, model, style_files, weight=0.3), style_files, weight=0.5)
    once = _apply(host, model, style_files, weight=0.8)
    a, _ = _forward(twice)
    b, _ = _forward(once)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(a, _forward(model)[0])


def test_several_style_images_are_averaged(host, tiny_models, style_files):
    model = tiny_models[0]
    two = _forward(_apply(host, model, style_files, image=torch.cat([_style_image(1), _style_image(2)])))[0]
    one = _forward(_apply(host, model, style_files, image=_style_image(1)))[0]
    assert not torch.equal(two, one)


def test_ip_adapter_loader_caches_and_reloads_changed_files(host, tiny_models, style_files):
    path = host.base / "models" / "ipadapter" / "tiny_ip_adapter.safetensors"
    a, b = _adapter(host), _adapter(host)
    assert a is b
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert _adapter(host) is not a


@torch.inference_mode()
def test_style_reference_bad_inputs(host, tiny_models, style_files):
    model = tiny_models[0]
    node = host.M["STDStyleReference"]
    with pytest.raises(ValueError, match=r"SDXL IP-Adapter, 70 cross-attention layers.*SD1\.5 with 10"):
        node.execute(model, _adapter(host, "tiny_sdxl_shaped.safetensors"), style_files["clip_vision"],
                     _style_image(), 1.0, "style", 0.0, 1.0)
    with pytest.raises(ValueError, match="width 48 but this IP-Adapter expects 32"):
        _apply(host, model, style_files, clip_vision=style_files["clip_vision_48"])
    with pytest.raises(ValueError, match="could not read 'corrupt.safetensors'"):
        _adapter(host, "corrupt.safetensors")
    with pytest.raises(ValueError, match="was not found in the models/ipadapter folder"):
        _adapter(host, "missing.safetensors")
    with pytest.raises(ValueError, match=r"image: expected an IMAGE batch"):
        _apply(host, model, style_files, image=torch.rand(48, 40, 3))
    with pytest.raises(ValueError, match="start_percent/end_percent"):
        _apply(host, model, style_files, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="ipadapter: expected an IPADAPTER"):
        node.execute(model, "tiny_ip_adapter.safetensors", style_files["clip_vision"], _style_image(), 1.0, "style",
                     0.0, 1.0)


def test_bad_style_inputs_in_a_prompt_fail_the_node_and_the_server_keeps_running(host, tiny_ckpt, style_files):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}},
        "2": {"class_type": "STDIPAdapterLoader", "inputs": {"ipadapter_file": "tiny_sdxl_shaped.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny_clip_vision.safetensors"}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "5": {"class_type": "STDStyleReference", "inputs": {"model": ["1", 0], "ipadapter": ["2", 0],
                                                            "clip_vision": ["3", 0], "image": ["4", 0], "weight": 1.0,
                                                            "preset": "style", "start_percent": 0.0,
                                                            "end_percent": 1.0}},
        "6": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["5", 0], "model2": ["1", 0], "ratio": 1.0}},
        "7": {"class_type": "CheckpointSave", "inputs": {"model": ["6", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "filename_prefix": "never"}},
    }
    ex, server = comfy_host.execute(prompt)
    errors = [d for e, d in server.events if e == "execution_error"]
    assert not ex.success and errors[0]["node_type"] == "STDStyleReference"
    assert "SDXL IP-Adapter" in errors[0]["exception_message"]
    prompt["2"]["inputs"]["ipadapter_file"] = "tiny_ip_adapter.safetensors"
    del prompt["7"], prompt["6"]  # the host still runs the next prompt
    prompt["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    ex, server = comfy_host.execute(prompt)
    assert ex.success
