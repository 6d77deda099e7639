"""The SiD toy check on a CPU: the exact GMM teacher is right, and a short run with the project's SiD losses brings
the one-step generator's samples close to the teacher's distribution."""

import torch

from comfyui_std.core.schedules import DiscreteSchedule
from training.common.toy import GMM, sliced_wasserstein
from training.sid_lsg.toy import run


def test_exact_teacher_eps_matches_a_monte_carlo_posterior():
    gmm, acp = GMM(), DiscreteSchedule().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(200_000, g)
    eps = torch.randn(x0.shape, generator=g)
    a = acp[500]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    # E[ε | x_t] near a query point, estimated from the samples that land close to it
    q = x_t[0]
    near = (x_t - q).norm(dim=1) < 0.05
    assert near.sum() > 50
    mc = eps[near].mean(0)
    exact = gmm.eps(q[None], a.view(1))[0]
    assert torch.allclose(mc, exact, atol=0.15)


def test_short_sid_run_shrinks_the_distance_at_least_fivefold():
    r = run(steps=600, seed=0)
    assert r["shrink"] >= 5, r
    gmm = GMM()
    same = sliced_wasserstein(gmm.sample(4000, torch.Generator().manual_seed(5)),
                              gmm.sample(4000, torch.Generator().manual_seed(6)))
    assert same < r["after"] < r["before"]
