"""The memory plan (std_hf.memory): placement and VAE sub-batch from a budget, at real SDXL component sizes."""

import pytest
import torch

from comfyui_std.core.errors import STDInputError
from std_hf.memory import GIB, device_budget, plan_memory, vae_peak_bytes

SDXL = {"unet": int(4.78 * GIB), "text_encoders": int(1.52 * GIB), "vae": int(0.31 * GIB)}  # fp16 UNet/TEs, fp32 VAE


def test_a_16_frame_block_under_a_4_gib_budget_codes_one_frame_at_a_time():
    plan = plan_memory(SDXL, (576, 1024), device="cuda", budget=4 * GIB, frames_per_batch=1)
    assert plan.offload == "sequential" and plan.vae_batch == 1 and not plan.vae_tiling
    assert plan.vae_calls(16) == 1
    assert vae_peak_bytes(plan.vae_calls(16), 576, 1024) < 4 * GIB < vae_peak_bytes(16, 576, 1024)


@pytest.mark.parametrize("budget, mode", [(4, "sequential"), (8, "model"), (12, "model"), (24, "none")])
def test_placement_follows_the_budget(budget, mode):
    """8 GB cannot hold SDXL whole (6.6 GiB of weights plus activations): components move when used; 24 GB can."""
    plan = plan_memory(SDXL, (1024, 1024), device="cuda", budget=budget * GIB)
    assert plan.offload == mode, plan.describe()
    assert plan.resident == (sum(SDXL.values()) if mode == "none" else 0)
    assert plan.vae_batch >= 1


def test_tiling_when_one_frame_does_not_fit():
    plan = plan_memory({"vae": int(0.31 * GIB)}, (2048, 2048), device="cuda", budget=3 * GIB, offload="none")
    assert plan.vae_tiling and plan.vae_batch == 1


def test_no_budget_keeps_everything_and_a_forced_mode_is_honoured_with_a_warning():
    free = plan_memory(SDXL, (576, 1024), device="cpu")
    assert (free.offload, free.vae_batch, free.budget) == ("none", None, None) and free.vae_calls(16) == 16
    forced = plan_memory(SDXL, (1024, 1024), device="cuda", budget=4 * GIB, offload="none")
    assert forced.offload == "none" and "more than the" in forced.describe()
    assert "offload none" in forced.describe() and "4.0 GiB" in forced.describe()


@pytest.mark.bad_input
def test_bad_offload_and_budget_are_refused():
    with pytest.raises(STDInputError, match="offload: got 'half'"):
        plan_memory(SDXL, (64, 64), offload="half")
    with pytest.raises(STDInputError, match="vram_budget"):
        device_budget(torch.device("cpu"), 0.0)
    assert device_budget(torch.device("cpu"), 4) == 4 * GIB and device_budget(torch.device("cpu")) is None
