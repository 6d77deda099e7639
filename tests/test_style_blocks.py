"""Core style-block presets and IP-Adapter parsing: one definition for ComfyUI patch keys and diffusers scales."""

import pytest
import torch

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.style_blocks import (PRESET_NAMES, check_adapter_fits, comfy_patch_key, diffusers_ip_scale,
                                           image_prompt_tokens, ip_layer_order, nest_ip_adapter, parse_ip_adapter,
                                           selects, target_blocks)


def _tiny_unet(arch: str):
    from diffusers import UNet2DConditionModel

    if arch == "sdxl":  # SDXL's block layout (DownBlock2D first, 2 attentions per down level, 3 per up level)
        cfg = dict(block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                    "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 3), cross_attention_dim=32, attention_head_dim=4)
    else:  # SD1.5's layout (three attention levels down, UpBlock2D first up)
        cfg = dict(block_out_channels=(8, 8, 16, 16), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
                   attention_head_dim=4)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                                **cfg)


def _cross_attn_names(unet):
    return [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_diffusers_scale_dict_enables_exactly_the_preset_layers(arch, preset):
    """diffusers' set_ip_adapter_scale expands our dict to per-layer scales; they must match our name selection."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    unet = _tiny_unet(arch)
    scale = diffusers_ip_scale(preset, arch, 0.7)
    (config,) = _maybe_expand_lora_scales(unet, [scale], default_scale=0.0)
    names = _cross_attn_names(unet)
    enabled = set()
    for name in names:  # what set_ip_adapter_scale does for each IP-Adapter processor
        s = config
        if isinstance(config, dict):
            s = 0.0
            for k, v in config.items():
                if (name + ".processor").startswith(k):
                    s = v
        if s:
            assert s == pytest.approx(0.7)
            enabled.add(name)
    expected = {n for n in names if selects(n, target_blocks(preset, arch))}
    assert enabled == expected and expected


def test_presets_name_the_instantstyle_blocks():
    assert target_blocks("style", "sdxl") == ("up_blocks.0.attentions.1",)
    assert target_blocks("layout", "sdxl") == ("down_blocks.2.attentions.1",)
    assert target_blocks("style", "sd15") == ("up_blocks.1",)
    assert diffusers_ip_scale("style", "sdxl", 1.0) == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert selects("up_blocks.0.attentions.1.transformer_blocks.9.attn2", ("up_blocks.0.attentions.1",))
    assert not selects("up_blocks.0.attentions.10.transformer_blocks.0.attn2", ("up_blocks.0.attentions.1",))
    with pytest.raises(STDInputError, match="preset"):
        target_blocks("composition", "sdxl")
    with pytest.raises(STDInputError, match="architecture"):
        diffusers_ip_scale("style", "flux")


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_ip_layer_order_is_diffusers_attn_processor_order(arch):
    unet = _tiny_unet(arch)
    names = _cross_attn_names(unet)
    shuffled = list(reversed(names))
    assert ip_layer_order(shuffled) == names
    # and the k-th cross-attention is processor 2k+1 (attn1 and attn2 alternate), as IP-Adapter files number them
    procs = list(unet.attn_processors)
    assert [procs.index(n + ".processor") for n in names] == list(range(1, 2 * len(names), 2))


def test_comfy_patch_keys():
    assert comfy_patch_key("output_blocks.1.1.transformer_blocks.3.attn2") == ("output", 1, 3)
    assert comfy_patch_key("input_blocks.8.1.transformer_blocks.0.attn2") == ("input", 8, 0)
    assert comfy_patch_key("middle_block.1.transformer_blocks.2.attn2") == ("middle", 0, 2)
    with pytest.raises(ValueError):
        comfy_patch_key("output_blocks.1.1.transformer_blocks.3.attn1")


def _adapter(cross=8, clip=6, tokens=2, inner=(16, 16, 32)):
    g = torch.Generator().manual_seed(0)
    sd = {"image_proj.proj.weight": torch.randn(tokens * cross, clip, generator=g),
          "image_proj.proj.bias": torch.randn(tokens * cross, generator=g),
          "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for k, d in enumerate(inner):
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = torch.randn(d, cross, generator=g)
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = torch.randn(d, cross, generator=g)
    return sd


def test_parse_flat_and_nested_layouts():
    sd = _adapter()
    w = parse_ip_adapter(sd)
    assert (w.cross_dim, w.clip_dim, w.tokens, w.num_layers) == (8, 6, 2, 3)
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}}
    w2 = parse_ip_adapter(nested)
    assert torch.equal(w2.to_k[2], w.to_k[2])


def test_nest_ip_adapter_groups_flat_and_nested_files_and_refuses_foreign_tensors():
    sd = _adapter()
    nested = nest_ip_adapter(sd)
    assert set(nested) == {"image_proj", "ip_adapter"}
    assert sum(len(v) for v in nested.values()) == len(sd)  # every tensor kept
    assert nested["image_proj"]["proj.weight"] is sd["image_proj.proj.weight"]
    assert nested["ip_adapter"]["5.to_v_ip.weight"] is sd["ip_adapter.5.to_v_ip.weight"]
    again = nest_ip_adapter(nested)  # the nested .bin layout
    assert again.keys() == nested.keys() and all(again[g].keys() == nested[g].keys() for g in nested)
    for extra in ("text_proj.weight", "image_proj", "ip_adapter"):  # foreign, or a group name with no tensor under it
        with pytest.raises(STDInputError, match=f"ipadapter: holds '{extra}', outside image_proj.* and ip_adapter.*"):
            nest_ip_adapter({**sd, extra: torch.zeros(2)})


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: {}, "no tensors"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("image_proj.norm")}, "not an IP-Adapter"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("ip_adapter")}, "no ip_adapter"),
    (lambda sd: {k: v for k, v in sd.items() if k != "ip_adapter.3.to_v_ip.weight"}, "to_v_ip.weight is missing"),
    (lambda sd: {**sd, "image_proj.latents": torch.zeros(1, 4, 8)}, "Plus"),
    (lambda sd: {**sd, "ip_adapter.1.to_k_ip.weight": torch.zeros(16, 5)}, "expected"),
    (lambda sd: {**{k: v for k, v in sd.items() if not k.startswith("ip_adapter.3.")}}, "numbering"),
    (lambda sd: "not a dict", "no tensors"),
])
def test_parse_rejects_broken_adapters(mutate, match):
    with pytest.raises(STDInputError, match=match):
        parse_ip_adapter(mutate(_adapter()))


def test_sd15_adapter_on_sdxl_is_rejected_with_a_clear_message():
    """Real shapes: SD1.5 IP-Adapter = 16 layers of width 768; SDXL = 70 cross-attentions of width 2048."""
    sd15_inner = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    sdxl_inner = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
    w = parse_ip_adapter(_adapter(cross=768, clip=1024, tokens=4, inner=sd15_inner))
    with pytest.raises(STDInputError, match=r"SD1\.5 IP-Adapter, 16 cross-attention layers.*SDXL with 70"):
        check_adapter_fits(w, 2048, sdxl_inner, "this model")
    check_adapter_fits(w, 768, sd15_inner, "this model")  # and it fits SD1.5
    with pytest.raises(STDInputError, match="projects to 320"):
        check_adapter_fits(w, 768, [640] + sd15_inner[1:], "this model")


def test_image_tokens_average_style_images_and_check_clip_width():
    w = parse_ip_adapter(_adapter())
    a, b = torch.randn(1, 6), torch.randn(1, 6)
    cond2, uncond = image_prompt_tokens(w, torch.cat([a, b]))
    cond_mean, _ = image_prompt_tokens(w, (a + b) / 2)
    assert cond2.shape == (1, 2, 8) and torch.allclose(cond2, cond_mean)
    assert torch.allclose(uncond, w.project(torch.zeros(1, 6)))
    with pytest.raises(STDInputError, match="width 5 but this IP-Adapter expects 6"):
        image_prompt_tokens(w, torch.randn(1, 5))
