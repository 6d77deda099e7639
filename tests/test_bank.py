"""Trajectory bank and STD trajectory math: context travels with the state, uniform draws, fp16 shards on disk,
checkpoint round trip, disk-full refusal; grid, windows (official and the paper's γ) and jump match the official
values (docs/official-std-code.md)."""

import pytest
import torch

from comfyui_std.core.errors import STDInputError
from training.std.trajectory_bank import BankDiskFullError, TrajectoryBank
from comfyui_std.core.vp import add_noise, x0_eps
from training.std.trajectory import (DDIMGrid, cfg_lcm, draw_target_index, jump, pseudo_huber, start_index,
                                     target_bounds, window_size)


def _ctx(i):
    return {"z0": torch.full((4, 8, 8), float(i)), "prompt_embeds": torch.full((7, 16), float(i))}


def test_entries_keep_their_own_context_through_advances(tmp_path):
    bank = TrajectoryBank(tmp_path, capacity=3, rho=1.0, seed=0)
    for i in range(3):
        bank.put(38, torch.full((4, 8, 8), 100.0 + i), _ctx(i), caption=f"caption {i}", w=5.0 + i)
    assert bank.put(38, torch.zeros(4, 8, 8), _ctx(9)) is None and bank.stats["dropped"] == 1
    for _ in range(20):
        e = bank.draw()
        t = e.tensors(bank.root)
        i = int(t["z0"][0, 0, 0])
        assert e.caption == f"caption {i}" and e.w == 5.0 + i and torch.all(t["prompt_embeds"] == i)
        bank.step(e, e.index - 1, t["state"] + 1, last_index=1)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(e.file for e in bank.entries.values())


def test_draws_are_uniform_over_filled_entries_and_respect_rho(tmp_path):
    bank = TrajectoryBank(tmp_path, capacity=4, rho=0.8, seed=1)
    entries = [bank.put(10, torch.zeros(2), {}) for _ in range(4)]
    bank.retire(entries[1])  # a hole in the middle must not make anything unreachable (official bug 2)
    counts = {e.key: 0 for e in bank.entries.values()}
    fresh = 0
    for _ in range(3000):
        e = bank.draw()
        if e is None:
            fresh += 1
        else:
            counts[e.key] += 1
    assert abs(fresh / 3000 - 0.2) < 0.03
    for c in counts.values():
        assert abs(c / 2400 - 1 / 3) < 0.04


@pytest.mark.parametrize("buckets", [1, 4, 8])
def test_the_share_of_fresh_starts_is_one_minus_rho_whatever_the_bucket_count(tmp_path, buckets):
    """Bug caught: one capacity shared by all buckets (with 8 buckets about 65 % of steps restart at the start index
    instead of the official bank's 20 %, so later trajectory states are under-trained)."""
    bank = TrajectoryBank(tmp_path, capacity=4, rho=0.8, seed=1)
    g = torch.Generator().manual_seed(buckets)
    n0, steps, warm = 20, 3000, 400
    fresh = 0
    for step in range(steps):
        bucket = (64, 64 + 8 * int(torch.randint(buckets, (), generator=g)))  # batches of one bucket, as the sampler
        entry = bank.draw_batch(1, bucket)[0]
        index = n0 if entry is None else entry.index
        fresh += step >= warm and index == n0
        bank.step(entry, index - 1, torch.zeros(1, 2, 2), {"z0": torch.zeros(1, 2, 2)}, last_index=1,
                  meta={"group": bucket})
    share = fresh / (steps - warm)
    assert 0.17 < share < 0.24, share
    assert all(sum(e.meta["group"] == k for e in bank.entries.values()) <= 4 for k in {e.meta["group"]
                                                                                       for e in bank.entries.values()})


def test_trajectories_retire_at_the_last_index(tmp_path):
    bank = TrajectoryBank(tmp_path, capacity=1, rho=1.0)
    bank.step(None, 3, torch.zeros(2), {}, last_index=1)
    e = bank.draw()
    assert e.index == 3
    bank.step(e, 2, torch.ones(2), last_index=1)
    assert bank.draw().index == 2
    bank.step(bank.draw(), 1, torch.ones(2), last_index=1)
    assert len(bank) == 0 and not list(tmp_path.glob("*.safetensors"))


def test_states_are_fp16_shards_and_ram_does_not_hold_them(tmp_path):
    bank = TrajectoryBank(tmp_path, capacity=8)
    e = bank.put(20, torch.randn(4, 16, 16), {"z0": torch.randn(4, 16, 16)})
    from safetensors import safe_open
    with safe_open(str(tmp_path / e.file), "pt") as f:
        assert f.get_tensor("state").dtype == torch.float16
    assert not any(isinstance(v, torch.Tensor) for v in vars(e).values())


def test_checkpoint_round_trip_restores_entries_and_rng(tmp_path):
    bank = TrajectoryBank(tmp_path / "a", capacity=4, rho=0.7, seed=3)
    for i in range(3):
        bank.put(30 + i, torch.full((2,), float(i)), _ctx(i), caption=str(i))
    bank.draw()
    bank.save_to(tmp_path / "ckpt")
    expected = [(e.key if e else None) for e in (bank.draw() for _ in range(10))]
    other = TrajectoryBank(tmp_path / "b", capacity=1, rho=0.1, seed=99)
    other.load_from(tmp_path / "ckpt")
    assert (other.capacity, other.rho, len(other)) == (4, 0.7, 3)
    assert [(e.key if e else None) for e in (other.draw() for _ in range(10))] == expected
    e = next(iter(other.entries.values()))
    assert e.tensors(other.root)["z0"][0, 0, 0] == float(e.caption)


def test_disk_full_is_refused_with_a_clear_message(tmp_path):
    bank = TrajectoryBank(tmp_path, min_free_bytes=2**62)
    with pytest.raises(BankDiskFullError, match="free disk space"):
        bank.put(10, torch.zeros(2), {})
    assert len(bank) == 0


def test_grid_window_and_start_match_the_official_values():
    grid = DDIMGrid()
    assert start_index(0.75) == 38 and grid.timestep(torch.tensor([38])).item() == 779
    assert [start_index(e) for e in (0.65, 0.75, 0.85, 0.95)] == [33, 38, 43, 48]
    assert [window_size(e, 0.5) for e in (0.65, 0.75, 0.85, 0.95)] == [17, 19, 22, 24]
    assert [window_size(e, 0.3) for e in (0.65, 0.75, 0.85, 0.95)] == [10, 12, 13, 15]
    assert torch.isclose(grid.alpha_prev(torch.tensor([0])), grid.schedule.alphas_cumprod[0])
    assert torch.isclose(grid.alpha_prev(torch.tensor([20])), grid.schedule.alphas_cumprod[399])
    with pytest.raises(STDInputError, match="start_strength"):
        start_index(0.02)


def test_target_window_never_contains_the_teacher_level():
    g = torch.Generator().manual_seed(0)
    n = torch.full((5000,), 38)
    j = draw_target_index(n, 19, g)
    assert j.min() == 19 and j.max() == 37  # s = τ_{j-1} <= τ_{n-2} < τ_{n-1}
    j2 = draw_target_index(torch.full((100,), 3), 19, g)
    assert j2.min() == 0 and j2.max() == 2


def test_jump_param_and_guidance_identities():
    grid = DDIMGrid()
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    idx = torch.tensor([38, 12])
    a = grid.alpha(idx)
    x = add_noise(z0, eps, a)
    for pt, out in (("epsilon", eps), ("v_prediction", a.sqrt().view(-1, 1, 1, 1) * eps
                                         - (1 - a).sqrt().view(-1, 1, 1, 1) * z0), ("sample", z0)):
        x0, e = x0_eps(out, x, a, pt)
        assert torch.allclose(x0, z0, atol=1e-4) and torch.allclose(e, eps, atol=1e-3)
    assert torch.allclose(jump(z0, eps, a), x, atol=1e-6)
    g = cfg_lcm((z0, eps), (z0 * 0, eps * 0), torch.tensor([0.0, 2.0]))
    assert torch.allclose(g[0][0], z0[0]) and torch.allclose(g[0][1], 3 * z0[1])
    assert pseudo_huber(z0, z0) == 0 and pseudo_huber(z0, z0 + 1) == pytest.approx((1 + 1e-6) ** 0.5 - 1e-3)


def test_the_paper_window_keeps_s_within_gamma_t_and_below_the_teacher_level():
    grid = DDIMGrid()
    n = torch.arange(2, 49)
    low, high = target_bounds(n, 19, "paper", 0.7, grid)
    s_low = torch.where(low > 0, grid.timesteps[(low - 1).clamp(min=0)], torch.zeros_like(low))
    s_high = grid.timesteps[high - 1]
    t_n = grid.timestep(n)
    assert bool((s_high < grid.timestep(n - 1)).all())  # s <= τ_{n-2}: never the teacher's own next level
    ok = s_low >= 0.7 * t_n  # s >= γ t wherever a grid level qualifies ...
    assert bool(ok[n >= 6].all()) and not bool(ok.all())
    assert bool((low[~ok] == high[~ok]).all() and (s_high[~ok] < 0.7 * t_n[~ok]).all())  # ... else the nearest one
    if_lower = torch.where(low > 1, grid.timesteps[(low - 2).clamp(min=0)], torch.zeros_like(low))
    assert bool((if_lower[ok & (low > 0)] < 0.7 * t_n[ok & (low > 0)]).all())  # and the window is the widest one
    # at the start state n0 = 38 (t 779): s in {559, ..., 739}, vs the official {379, ..., 739}
    assert [int(v) for v in target_bounds(torch.tensor([38]), 19, "paper", 0.7, grid)[0]] == [28]
    assert [int(v) for v in target_bounds(torch.tensor([38]), 19, "official", 0.7, grid)[0]] == [19]
    g = torch.Generator().manual_seed(0)
    j = draw_target_index(torch.full((4000,), 38), 19, g, "paper", 0.7, grid)
    assert set(j.tolist()) == set(range(28, 38))
    full = target_bounds(torch.tensor([10]), 19, "paper", 0.0, grid)
    assert [int(full[0]), int(full[1])] == [0, 9]  # γ = 0: every level down to s = 0
    with pytest.raises(STDInputError, match="s_window"):
        target_bounds(torch.tensor([10]), 19, "wide")
    with pytest.raises(STDInputError, match="s_gamma"):
        target_bounds(torch.tensor([10]), 19, "paper", 1.0)
