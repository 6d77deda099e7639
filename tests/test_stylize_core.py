"""The shared stylize loop (comfyui_std.core.stylize, .noise, .chunks): noise conventions, chunking, shared noise."""

import pytest
import torch

from comfyui_std.core.chunks import Chunking
from comfyui_std.core import DiscreteSchedule, KDenoiser, STDInputError, sample_std, std_plan
from comfyui_std.core.noise import start_noise
from comfyui_std.core.stylize import stylize_latents


def toy_eps(x, t):
    """A fixed nonlinear per-pixel eps-network of (x_vp, t) that treats every batch entry alike."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
    return torch.tanh(x.roll(1, dims=1) * 0.7 + t) + 0.1 * x


@pytest.fixture
def setup():
    schedule = DiscreteSchedule()
    return KDenoiser(toy_eps, schedule), schedule, std_plan(4, 0.75).sigmas(schedule)


def test_start_noise_follows_comfyui_prepare_noise():
    latents = torch.zeros(3, 4, 8, 8)
    shared = start_noise(latents, 42)
    # ComfyUI: torch.randn(shape, generator=torch.manual_seed(seed)) on the CPU, drawn for one frame when shared
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42))
    assert torch.equal(shared[0], expected[0]) and all(torch.equal(shared[0], f) for f in shared)
    per_frame = start_noise(latents, 42, "per_frame")
    assert torch.equal(per_frame, torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(42)))


def test_one_chunk_is_sample_std_on_the_noised_latent(setup):
    denoiser, schedule, sigmas = setup
    latents = torch.randn(2, 4, 8, 8)
    out = stylize_latents(denoiser, latents, sigmas, 7, disable=True, chunking=Chunking(None, 0, "per_frame"))
    x = latents + sigmas[0] * start_noise(latents, 7, "per_frame")
    assert torch.allclose(out, sample_std(denoiser, x, sigmas, disable=True, schedule=schedule), atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_static_frames_stay_identical_with_shared_noise_across_chunks(setup, gamma):
    denoiser, schedule, sigmas = setup
    latents = torch.randn(1, 4, 8, 8).repeat(7, 1, 1, 1)
    out = stylize_latents(denoiser, latents, sigmas, 3, gamma=gamma,
                          schedule=schedule, disable=True, chunking=Chunking(3, 1))
    assert all(torch.equal(out[0], f) for f in out[1:])
    per_frame = stylize_latents(denoiser, latents, sigmas, 3, gamma=gamma, schedule=schedule, disable=True,
                                chunking=Chunking(3, 1, "per_frame"))
    assert not torch.equal(per_frame[0], per_frame[1])


def test_chunks_are_sampled_independently_and_cross_faded():
    # a network that sees the whole batch (like a motion module), so a frame's result depends on its chunk
    denoiser = KDenoiser(lambda x, t: toy_eps(x, t) + 0.3 * x.mean(0, keepdim=True), DiscreteSchedule())
    sigmas = std_plan(4, 0.75).sigmas(DiscreteSchedule())
    latents = torch.randn(5, 4, 8, 8)
    out = stylize_latents(denoiser, latents, sigmas, 1, disable=True, chunking=Chunking(3, 1))
    first = stylize_latents(denoiser, latents[:3], sigmas, 1, disable=True)   # chunk (0, 3) alone
    second = stylize_latents(denoiser, latents[2:], sigmas, 1, disable=True)  # chunk (2, 5) alone
    assert torch.allclose(out[:2], first[:2], atol=1e-6) and torch.allclose(out[3:], second[1:], atol=1e-6)
    assert torch.allclose(out[2], 0.5 * first[2] + 0.5 * second[0], atol=1e-6)  # the shared frame, cross-faded
    assert not torch.allclose(first[2], second[0], atol=1e-4)


def test_bad_inputs_are_refused(setup):
    denoiser, _, sigmas = setup
    with pytest.raises(STDInputError, match="noise: got 'random'"):
        stylize_latents(denoiser, torch.zeros(1, 4, 8, 8), sigmas, 0, chunking=Chunking(None, 0, "random"))
    with pytest.raises(STDInputError, match="latents: expected a batch"):
        stylize_latents(denoiser, torch.zeros(4, 8, 8), sigmas, 0)
    with pytest.raises(STDInputError, match="overlap"):
        stylize_latents(denoiser, torch.zeros(4, 4, 8, 8), sigmas, 0, chunking=Chunking(2, 2))
