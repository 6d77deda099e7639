"""LoRA key conversion and STD metadata (pure torch; checked against diffusers' own kohya conversion)."""

import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya

from comfyui_std.core.lora_format import (encode_std_metadata, eta_mismatch_warning, lora_module_names,
                                   peft_alpha_from_metadata, std_metadata, to_kohya)

PEFT = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4),
    "unet.up_blocks.0.attentions.1.proj_in.lora_A.weight": torch.randn(4, 64, 1, 1),
    "unet.up_blocks.0.attentions.1.proj_in.lora_B.weight": torch.randn(64, 4, 1, 1),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4),
}


def test_peft_to_kohya_matches_diffusers():
    ours, motion = to_kohya(PEFT)
    theirs = convert_state_dict_to_kohya(dict(PEFT))
    assert not motion
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k].float(), theirs[k].float()), k


def test_alpha_from_peft_metadata_and_old_diffusers_keys():
    meta = {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 2}'}
    ours, _ = to_kohya(PEFT, alpha=peft_alpha_from_metadata(meta))
    assert float(ours["lora_unet_up_blocks_0_attentions_1_proj_in.alpha"]) == 2.0
    old = {"unet.mid_block.attentions.0.proj_out.lora.down.weight": torch.randn(2, 8),
           "unet.mid_block.attentions.0.proj_out.lora.up.weight": torch.randn(8, 2)}
    conv, _ = to_kohya(old)
    assert lora_module_names(conv) == {"lora_unet_mid_block_attentions_0_proj_out"}


def test_motion_keys_are_split_off_and_kohya_passes_through():
    sd = {"unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 8),
          "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": torch.zeros(2, 8)}
    kohya, motion = to_kohya(sd)
    assert list(motion) == ["unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert list(kohya) == ["lora_unet_mid_block_attentions_0_proj_out.lora_down.weight"]


def test_std_metadata_roundtrip_and_filename_eta():
    meta = encode_std_metadata({"start_strength": 0.75, "nfe": 8, "method": "std", "base_model": "sdxl"})
    assert meta["std.start_strength"] == "0.75"
    info = std_metadata(meta)
    assert info == {"start_strength": 0.75, "nfe": 8, "method": "std", "base_model": "sdxl"}
    assert std_metadata({}, "std_sdxl_i2i_eta0.65.safetensors")["start_strength"] == 0.65
    assert "start_strength" not in std_metadata({}, "my_style.safetensors")
    with pytest.raises(ValueError):
        encode_std_metadata({"rr": float("nan")})


def test_eta_mismatch_warning():
    assert eta_mismatch_warning(0.75, 0.75) is None
    assert eta_mismatch_warning(None, 0.5) is None
    assert "trained for" in eta_mismatch_warning(0.75, 0.65)



@pytest.mark.bad_input
@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({K + ".lora_down.weight": torch.full((2, 8), float("inf"))}), "non-finite"),
    (lambda sd: sd.update({K + ".lora_up.weight": torch.ones(8, 2, dtype=torch.int8)}), "is int8"),
    (lambda sd: sd.pop(K + ".lora_up.weight"), "has a lora_down factor but no lora_up"),
    (lambda sd: sd.update({"unet.x.to_q.lora_B.weight": torch.zeros(8, 2)}), "has a lora_B factor but no lora_A"),
    (lambda sd: sd.update({K + ".alpha": torch.tensor(float("nan"))}), "non-finite"),
])
def test_lora_tensors_that_cannot_be_applied_are_refused(change, message):
    """Bug caught: a NaN, inf or int8 LoRA reported as "N/N layers applied" (an all-NaN result), a lora_down
    without its lora_up counted as a layer."""
    from comfyui_std.core.lora_format import check_lora_tensors

    sd = {K + ".lora_down.weight": torch.zeros(2, 8), K + ".lora_up.weight": torch.zeros(8, 2),
          K + ".alpha": torch.tensor(2.0)}
    check_lora_tensors(dict(sd), "ok.safetensors")
    change(sd)
    with pytest.raises(ValueError, match=message):
        check_lora_tensors(sd, "bad.safetensors")


K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.bad_input
def test_header_numbers_out_of_range_are_ignored_and_listed_never_shown_as_trained_values():
    """Bug caught: std.start_strength="nan" and std.nfe="-3" shown to the user as the LoRA's trained values."""
    from comfyui_std.core.lora_format import std_metadata

    info = std_metadata({"std.start_strength": "NaN", "std.nfe": "-3", "std.gamma": '"0.2"', "std.t_init": "625.5",
                         "std.rank": "true", "std.kind": '"v2v"'}, "std_sdxl_v2v_eta0.75.safetensors")
    assert info["start_strength"] == 0.75 and info["source"] == "filename"  # from the name, not the header's NaN
    assert info["gamma"] == 0.2 and info["kind"] == "v2v"
    assert "nfe" not in info and "t_init" not in info and "rank" not in info
    assert sorted(x.split("=")[0] for x in info["invalid"]) == ["nfe", "rank", "start_strength", "t_init"]
    assert std_metadata({"std.start_strength": "0.6", "std.nfe": "4"}) == {"start_strength": 0.6, "nfe": 4}
