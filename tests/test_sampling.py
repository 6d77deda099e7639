"""Numerical parity of the core samplers with diffusers' TCDScheduler on the same eps-model, timesteps and noise."""

import pytest
import torch
from diffusers import TCDScheduler

from comfyui_std.core import DiscreteSchedule, KDenoiser, sample_lcm, sample_onestep, sample_std, std_plan
from comfyui_std.core.errors import STDInputError


class ToyEps(torch.nn.Module):
    """A fixed, nonlinear eps-prediction network of (x_vp, t)."""

    def __init__(self, channels=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) * 0.5
        self.b = torch.randn(channels, generator=g)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
        h = torch.einsum("oc,bchw->bohw", self.w, x)
        return torch.tanh(h + self.b.view(1, -1, 1, 1) * t) + 0.1 * x


def _diffusers_run(eps, z0, noise, plan, gamma, seed):
    sched = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(plan.scheduler_steps)
    n = plan.scheduler_steps
    t_start = n - int(n * plan.start_strength)
    ts = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    assert [int(t) for t in ts] == list(plan.timesteps)
    x = sched.add_noise(z0, noise, ts[:1])
    gen = torch.Generator().manual_seed(seed)
    states = [x]
    for t in ts:
        out = eps(x, t)
        x = sched.step(out, t, x, eta=gamma, generator=gen).prev_sample
        states.append(x)
    return states, sched.alphas_cumprod


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("nfe, eta", [(8, 0.75), (4, 0.65), (6, 0.95), (2, 0.85)])
def test_std_sampler_matches_diffusers_tcd(nfe, eta, gamma):
    torch.manual_seed(0)
    eps = ToyEps()
    z0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    plan = std_plan(nfe, eta)
    ref, abar = _diffusers_run(eps, z0, noise, plan, gamma, seed=123)

    schedule = DiscreteSchedule()
    denoiser = KDenoiser(eps, schedule)
    # diffusers' final TCD step lands on t = 0 (sigma_min), not sigma = 0; reproduce that for exact parity.
    sigmas = plan.sigmas(schedule, final_sigma=float(schedule.sigma_min))
    x = z0 + sigmas[0] * noise
    seen = []
    gen = torch.Generator().manual_seed(123)
    out = sample_std(denoiser, x, sigmas, callback=lambda d: seen.append(d["x"]), disable=True,
                     noise_sampler=lambda s, sn: torch.randn(x.shape, generator=gen), gamma=gamma, schedule=schedule)
    seen.append(out)
    ts = list(plan.timesteps) + [0]
    for i, (ours, theirs) in enumerate(zip(seen, ref)):
        vp = ours * abar[ts[i]].sqrt()  # VE -> VP
        diff = (vp - theirs).abs().max().item()
        assert diff <= 1e-4, f"step {i} (t={ts[i]}): max abs diff {diff}"


def test_default_final_step_returns_x0_of_last_prediction():
    eps = ToyEps()
    schedule = DiscreteSchedule()
    denoiser = KDenoiser(eps, schedule)
    plan = std_plan(4, 0.75)
    x = torch.randn(1, 4, 8, 8) * plan.sigmas(schedule)[0]
    last = {}
    out = sample_std(denoiser, x, plan.sigmas(schedule), callback=lambda d: last.update(d), disable=True)
    assert torch.equal(out, last["denoised"])


def test_gamma_zero_equals_euler_and_ddim():
    eps = ToyEps(seed=3)
    schedule = DiscreteSchedule()
    denoiser = KDenoiser(eps, schedule)
    sigmas = std_plan(8, 0.75).sigmas(schedule)
    x0 = torch.randn(1, 4, 8, 8) * sigmas[0]
    ours = sample_std(denoiser, x0.clone(), sigmas, disable=True, gamma=0.0)
    x = x0.clone()  # Euler in k-diffusion form
    for i in range(len(sigmas) - 1):
        den = denoiser(x, sigmas[i])
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    assert (ours - x).abs().max() < 1e-4


def test_gamma_one_is_lcm_like_and_stochastic_gamma_uses_seed():
    eps = ToyEps(seed=5)
    schedule = DiscreteSchedule()
    denoiser = KDenoiser(eps, schedule)
    sigmas = std_plan(4, 0.75).sigmas(schedule)
    x = torch.randn(1, 4, 8, 8) * sigmas[0]
    a = sample_std(denoiser, x, sigmas, disable=True, gamma=0.5, extra_args={"seed": 1})
    b = sample_std(denoiser, x, sigmas, disable=True, gamma=0.5, extra_args={"seed": 1})
    c = sample_std(denoiser, x, sigmas, disable=True, gamma=0.5, extra_args={"seed": 2})
    assert torch.equal(a, b) and not torch.equal(a, c)
    lcm = sample_lcm(denoiser, x, sigmas, disable=True, extra_args={"seed": 1})
    tcd1 = sample_std(denoiser, x, sigmas, disable=True, gamma=1.0, extra_args={"seed": 1})
    # gamma=1 jumps to t_s = 0 (sigma_min) instead of exactly x0, so it is close to LCM but not identical.
    assert (lcm - tcd1).abs().max() < 0.1 * lcm.abs().max()


def test_onestep_evaluates_once():
    calls = []

    def model(x, sigma):
        calls.append(sigma)
        return x * 0.5

    x = torch.ones(1, 4, 2, 2)
    out = sample_onestep(model, x, torch.tensor([2.5, 0.0]), disable=True)
    assert len(calls) == 1 and torch.equal(out, x * 0.5)


def test_v_prediction_denoiser_recovers_x0():
    schedule = DiscreteSchedule(prediction_type="v_prediction")
    x0 = torch.randn(2, 4, 4, 4)
    e = torch.randn_like(x0)
    t = torch.tensor([500, 500])
    a, s = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    v = a * e - s * x0

    def vnet(x_vp, tt):
        return v

    sigma = schedule.sigma(t)
    x_ve = x0 + sigma.view(-1, 1, 1, 1) * e
    den = KDenoiser(vnet, schedule)(x_ve, sigma)
    assert (den - x0).abs().max() < 1e-4


def test_schedule_matches_comfy_style_interpolation():
    s = DiscreteSchedule()
    assert abs(float(s.sigma_min) - 0.0292) < 1e-3 and abs(float(s.sigma_max) - 14.6146) < 1e-3
    t = torch.tensor([0, 19, 500, 999])
    assert torch.equal(s.timestep(s.sigma(t)), t)
    with pytest.raises(STDInputError, match="beta_schedule"):
        DiscreteSchedule(beta_schedule="cosine")


@pytest.mark.parametrize("gamma", [-0.1, 1.5, "x", None])
def test_bad_gamma(gamma):
    with pytest.raises(STDInputError, match="gamma"):
        sample_std(lambda x, s: x, torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0]), gamma=gamma, disable=True)
