"""SiD toy check: a one-step generator distilled data-free from an exact Gaussian-mixture teacher, on a CPU.

The data distribution is a 2-D mixture of Gaussians, so the teacher's noise prediction under the VP schedule of the
project (``DiscreteSchedule``, the SD betas) is exact: at level t the marginal is again a mixture with means
``a_t μ_k`` and covariances ``a_t² Σ_k + s_t² I``. A small MLP generator maps noise to samples in one step; a small
MLP fake score tracks the generator's noisy distribution. Both are trained with this project's SiD code
(:mod:`training.sid_lsg.losses`: ``fake_score_loss``, ``sid_generator_loss`` with α and the per-sample
normalisation, ``x0_from_eps``), alternating fake-score and generator updates with Adam β = (0, 0.999), t ~ U{20..979}.
No data samples are used for training; they are drawn only to measure the distance.

    python -m training.sid_lsg.toy [--steps 3000] [--seed 0]
    # last line: sid_toy_distance_shrink: X   (sliced Wasserstein distance before / after; goal >= 5)
"""

from __future__ import annotations

import argparse
import time

import torch

from comfyui_std.core.schedules import DiscreteSchedule
from training.common.toy import GMM, Score, mlp, sliced_wasserstein
from training.sid_lsg.losses import fake_score_loss, sid_generator_loss, x0_from_eps


def run(steps: int = 3000, batch: int = 256, lr: float = 1e-3, fake_lr: float = 1e-3, alpha: float = 1.0,
        seed: int = 0, t_min: int = 20, t_max: int = 979, log_every: int = 0) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher, acp = GMM(), DiscreteSchedule().alphas_cumprod
    gen, fake = mlp(2, 2), Score()
    with torch.no_grad():  # start as a broad blob, far from the ring
        gen[-1].weight.mul_(0.1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(fake.parameters(), lr=fake_lr, betas=(0.0, 0.999))
    eval_z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(seed + 1))
    data = teacher.sample(4000, torch.Generator().manual_seed(seed + 2))

    def distance():
        with torch.no_grad():
            return sliced_wasserstein(gen(eval_z), data)

    before = distance()
    start = time.perf_counter()
    for step in range(steps):
        for phase in ("fake", "gen"):
            z = torch.randn(batch, 2, generator=g)
            eps = torch.randn(batch, 2, generator=g)
            t = torch.randint(t_min, t_max + 1, (batch,), generator=g)
            a = acp[t]
            if phase == "fake":
                with torch.no_grad():
                    x_g = gen(z)
                x_t = a.sqrt()[:, None] * x_g + (1 - a).sqrt()[:, None] * eps
                loss = fake_score_loss(fake(x_t, t), eps)
                opt_f.zero_grad(set_to_none=True)
                loss.backward()
                opt_f.step()
            else:
                x_g = gen(z)
                x_t = a.sqrt()[:, None] * x_g + (1 - a).sqrt()[:, None] * eps
                fake.requires_grad_(False)
                y_fake = x0_from_eps(x_t, fake(x_t, t), a)
                y_real = x0_from_eps(x_t, teacher.eps(x_t, a), a)
                loss = sid_generator_loss(x_g, y_real, y_fake, alpha)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_g.step()
                fake.requires_grad_(True)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: sliced W {distance():.4f}")
    after = distance()
    return {"before": before, "after": after, "shrink": before / max(after, 1e-12),
            "seconds": time.perf_counter() - start, "steps": steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=500)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    r = run(args.steps, seed=args.seed, log_every=args.log_every)
    print(f"sliced Wasserstein distance to the teacher's distribution: {r['before']:.4f} before, "
          f"{r['after']:.4f} after {r['steps']} steps ({r['seconds']:.0f} s)")
    print(f"sid_toy_distance_shrink: {r['shrink']:.2f}")


if __name__ == "__main__":
    main()
