"""The STD timestep plan against diffusers' own TCDScheduler + SDXL img2img timestep selection."""

import math
from types import SimpleNamespace

import pytest
from diffusers import StableDiffusionXLImg2ImgPipeline, TCDScheduler

from comfyui_std.core import STDInputError, max_nfe, official_inference_steps, origin_grid, std_plan, trained_start_index
from comfyui_std.core.schedules import DiscreteSchedule

ETAS = (0.65, 0.75, 0.85, 0.95)


def diffusers_img2img_timesteps(num_inference_steps: int, strength: float) -> list[int]:
    """What the official inference visits: TCDScheduler.set_timesteps(N) then the pipeline's get_timesteps."""
    sched = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(num_inference_steps)
    fake_pipe = SimpleNamespace(scheduler=sched)
    ts, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(fake_pipe, num_inference_steps, strength, "cpu")
    assert n == len(ts)
    return [int(t) for t in ts]


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("nfe", range(1, 13))
def test_official_plan_matches_diffusers(nfe, eta):
    plan = std_plan(nfe, eta)
    n = math.ceil(nfe / eta)
    assert plan.scheduler_steps == n
    expected = diffusers_img2img_timesteps(n, eta)
    assert list(plan.timesteps) == expected
    assert len(plan.timesteps) == nfe


def test_official_plan_reference_values():
    assert std_plan(8, 0.75).timesteps == (739, 639, 559, 459, 379, 279, 199, 99)
    assert std_plan(4, 0.75).timesteps == (679, 499, 339, 179)
    assert std_plan(6, 0.95).timesteps == (859, 719, 579, 439, 299, 159)
    assert std_plan(8, 0.75).start_timestep == 739


def test_trained_start_plan():
    assert [trained_start_index(e) for e in ETAS] == [33, 38, 43, 48]
    assert [std_plan(4, e, "trained_start").start_timestep for e in ETAS] == [679, 779, 879, 979]
    p = std_plan(8, 0.75, "trained_start")
    assert p.timesteps == (779, 699, 599, 499, 399, 299, 199, 99)
    # every timestep lies on the 50-step training grid and strictly descends
    for eta in ETAS:
        for nfe in range(1, 13):
            ts = std_plan(nfe, eta, "trained_start").timesteps
            assert all((t + 1) % 20 == 0 for t in ts)
            assert list(ts) == sorted(set(ts), reverse=True) and len(ts) == nfe


def test_float_noise_does_not_move_start_index():
    # 50 * 0.6 = 30.000000000000004 in floating point; the trained start is grid index 30 (t = 619).
    assert trained_start_index(0.6) == 30


def test_sigmas_end_in_zero_and_match_schedule():
    sched = DiscreteSchedule()
    sig = std_plan(8, 0.75).sigmas(sched)
    assert sig[-1] == 0 and len(sig) == 9
    assert sched.timestep(sig[:-1]).tolist() == [739, 639, 559, 459, 379, 279, 199, 99]


@pytest.mark.parametrize("kwargs, match", [
    (dict(nfe=8, start_strength=0.0), r"start_strength: got 0.0, allowed range is \(0.0, 1.0\]"),
    (dict(nfe=8, start_strength=1.5), r"start_strength: got 1.5, allowed range"),
    (dict(nfe=8, start_strength=-0.1), r"start_strength"),
    (dict(nfe=0, start_strength=0.75), r"nfe: got 0, allowed range is \[1, 50\]"),
    (dict(nfe=51, start_strength=0.75), r"nfe: got 51"),
    (dict(nfe=40, start_strength=0.75), r"nfe 40 at start_strength 0.75 needs .* most at this start_strength is 37"),
    (dict(nfe=2.5, start_strength=0.75), r"nfe: expected an integer"),
    (dict(nfe="8", start_strength=0.75), r"nfe: expected an integer, got '8'"),
    (dict(nfe=8, start_strength="0.75"), r"start_strength: expected a number"),
    (dict(nfe=8, start_strength=float("nan")), r"start_strength: got NaN"),
    (dict(nfe=8, start_strength=0.75, plan="karras"), r"plan: got 'karras'"),
    (dict(nfe=40, start_strength=0.75, plan="trained_start"), r"the most is 39"),
])
def test_bad_input_is_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(STDInputError, match=match):
        std_plan(**kwargs)


def test_max_nfe_is_reachable_and_tight():
    for eta in (0.1, 0.5, 0.65, 0.75, 1.0):
        for plan in ("official", "trained_start"):
            m = max_nfe(eta, plan)
            assert len(std_plan(m, eta, plan).timesteps) == m
            if m < 50:
                with pytest.raises(STDInputError):
                    std_plan(m + 1, eta, plan)


def test_official_inference_steps_full_strength():
    assert official_inference_steps(4, 1.0) == 4
    assert std_plan(4, 1.0).timesteps == (999, 759, 499, 259)


def test_teacher_plan_from_a_start_timestep():
    """Floor spacing from the start, the start itself first; refuses a start off the grid and too many steps."""
    from comfyui_std.core.plan import teacher_plan

    t = teacher_plan(779, 20)
    assert t.timesteps[0] == 779 and len(t.timesteps) == 20 and t.plan == "teacher"
    below = [g for g in reversed(origin_grid()) if g <= 779]
    assert list(t.timesteps) == [below[(k * 39) // 20] for k in range(20)]
    assert teacher_plan(779, 39).timesteps == tuple(below)  # every level
    with pytest.raises(STDInputError, match="not a level"):
        teacher_plan(780, 4)
    with pytest.raises(STDInputError, match=r"teacher_steps: got 40, allowed range is \[1, 39\]"):
        teacher_plan(779, 40)
