"""The VAE's precision: it runs in its own dtype whatever autocast the caller is in, never in fp16, and a VAE that
gives NaN says so instead of handing NaN latents on (std_hf.base.LatentCodec, std_hf.devices.vae_dtype_for)."""

import pytest
import torch

from comfyui_std.core.errors import STDInputError
from std_hf.base import LatentCodec
from std_hf.devices import vae_dtype_for
from std_hf.tiny import make_vae


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    vae = make_vae().eval()
    return LatentCodec(vae, 0.18215)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_never_reaches_the_vae(codec, autocast_dtype):
    """Inside a trainer's bf16 or fp16 autocast the fp32 VAE still computes in fp32: every conv sees autocast off
    and the latents equal those computed outside autocast (a codec that let autocast in would run the convs in
    bf16/fp16 and differ)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(torch.is_autocast_enabled("cpu")))
             for m in codec.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        pixels = torch.rand(2, 3, 32, 32) * 2 - 1
        plain = codec.encode(pixels)
        decoded = codec.decode(plain)
        seen.clear()
        with torch.autocast("cpu", dtype=autocast_dtype):
            inside = codec.encode(pixels)
            inside_decoded = codec.decode(inside)
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert torch.equal(inside_decoded, decoded)


def test_the_vae_never_runs_in_fp16():
    assert vae_dtype_for(torch.float32) == (torch.float32, None)
    assert vae_dtype_for(torch.bfloat16) == (torch.bfloat16, None)
    dtype, notice = vae_dtype_for(torch.float16)
    assert dtype == torch.float32 and "fp16" in notice


@pytest.mark.bad_input
def test_a_vae_that_gives_nan_is_refused_with_a_clear_message(codec):
    """An fp16 SDXL VAE overflows to NaN on real weights; here a weight is set to NaN to get the same output."""
    broken = make_vae().eval()
    with torch.no_grad():
        for name, p in broken.named_parameters():
            if name.endswith("conv_in.weight"):  # the encoder's and the decoder's
                p.fill_(float("nan"))
    with pytest.raises(STDInputError, match=r"vae: the VAE gave non-finite latents \(NaN or inf\) in float32"):
        LatentCodec(broken, 0.18215).encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(STDInputError, match="non-finite pixels"):
        LatentCodec(broken, 0.18215).decode(torch.zeros(1, 4, 4, 4))
