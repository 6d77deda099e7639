"""STD's central claim on a CPU toy, tested honestly: distilling along the teacher's own trajectories from a partially
noised start (STD) versus consistency distillation (CD) on freshly noised states, at the same budget.

Why this toy can show the effect: the **teacher is imperfect**. It is a small MLP ε(x, t) regressed onto a 2-D
Gaussian mixture (8 modes on a ring), so the states its probability-flow ODE visits from a partially noised start are
*not* distributed like freshly noised data at the same level. STD trains where the few-step sampler will go (the
teacher's trajectory states, kept in the trajectory bank); CD trains on forward-noised states.

* **Teacher**: :meth:`Toy.pretrained`, frozen. Its DDIM step on the 50-step grid is the distillation teacher; its own
  many-step DDIM solution (20 sub-steps per grid interval) from a noised start is the **reference** the students are
  scored against (:meth:`Toy.reference`).
* **Students**: copies of the teacher (the "undistilled base" is the teacher itself sampled with few steps),
  distilled per η ∈ {0.65, 0.75, 0.85, 0.95} with the same steps, batch, learning rate, target and EMA by

  - ``std``: this project's trajectory math and :class:`~training.std.trajectory_bank.TrajectoryBank` (start at
    ``n0 = ceil(50 η)``; with probability ρ continue a bank trajectory one teacher step; official target window);
  - ``cd``: the official code without STD: fresh index ``n ~ U{1, …, n0 - 1}`` and fresh noising every step;
  - ``cd+start``: the same with the start index included, ``n ~ U{1, …, n0}``;
  - ``cd@std``: fresh noising at exactly the indices the STD run trained at (its index distribution), isolating the
    one thing STD changes: trajectory states instead of forward-noised ones.

  Every method uses the same teacher step, the same window and pseudo-Huber loss, and an EMA of the weights (the
  evaluated network).
* **Evaluation**: held-out data noised to the first timestep of the inference plan (``std_plan(nfe, η,
  "trained_start")``), sampled with the core STD sampler (gamma 0); mean L2 distance to the teacher's reference from
  the same noisy start, NFE 2/4/8. The last line is ``std_toy_nfe4_error_vs_base``: STD's error over the undistilled
  base's at NFE 4, η 0.75.
* **Step time**: median wall time per training step of STD with the bank, CD, and STD *without* a bank (a state at
  depth m along a trajectory recomputed with m teacher steps), alternated in one run, plus teacher evaluations per
  step (the unit that dominates with a UNet teacher).

    python -m training.std.toy [--steps 1500] [--seed 0]   (or bench/std_toy.py)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from comfyui_std.core import DiscreteSchedule, KDenoiser, sample_std, std_plan
from training.common.ema import ema_copy, ema_update
from training.common.toy import GMM, Score
from training.std.trajectory_bank import TrajectoryBank
from comfyui_std.core.vp import add_noise, x0_eps
from training.std.trajectory import (LAST_INDEX, DDIMGrid, draw_target_index, jump, pseudo_huber, start_index,
                                     window_size)

ETAS = (0.65, 0.75, 0.85, 0.95)
NFES = (2, 4, 8)
METHODS = ("std", "cd", "cd+start", "cd@std")


class Toy:
    def __init__(self, seed: int = 0, batch: int = 1024, pretrain_steps: int = 300, lr: float = 1e-4,
                 ema: float = 0.999, rr: float = 0.5):
        self.gmm = GMM()
        self.schedule = DiscreteSchedule()
        self.grid = DDIMGrid(self.schedule)
        self.acp = self.schedule.alphas_cumprod
        self.batch, self.seed, self.lr, self.ema, self.rr = batch, seed, lr, ema, rr
        self.teacher = self.pretrained(pretrain_steps)
        self.teacher.requires_grad_(False)

    # the teacher ------------------------------------------------------------------------------------------------
    def pretrained(self, steps: int) -> Score:
        """The imperfect teacher: an MLP regressed onto the mixture's exact ε at random t, briefly."""
        torch.manual_seed(self.seed)
        net = Score()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(self.seed + 11)
        for _ in range(steps):
            x0 = self.gmm.sample(self.batch, g)
            t = torch.randint(0, 1000, (self.batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = self.acp[t][:, None]
            x = a.sqrt() * x0 + (1 - a).sqrt() * eps
            loss = ((net(x, t) - self.gmm.eps(x, self.acp[t])) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net.eval()

    @torch.no_grad()
    def teacher_step(self, x, n: int):
        """One DDIM grid step τ_n -> τ_{n-1} of the teacher (what training distils)."""
        idx = torch.full((x.shape[0],), n)
        x0, eps = x0_eps(self.teacher(x, self.grid.timestep(idx)), x, self.grid.alpha(idx))
        return jump(x0, eps, self.grid.alpha_prev(idx))

    @torch.no_grad()
    def reference(self, x, t_start: int, substeps: int = 20):
        """The teacher's own many-step DDIM solution from (x, t_start) to t = 0, returned as x0."""
        n = max(1, round(t_start / 20)) * substeps
        ts = torch.linspace(t_start, 0, n + 1).round().long()
        for a, b in zip(ts[:-1], ts[1:]):
            t = torch.full((x.shape[0],), int(a))
            eps = self.teacher(x, t)
            aa, ab = self.acp[int(a)], self.acp[int(b)]
            x0 = (x - (1 - aa).sqrt() * eps) / aa.sqrt()
            x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        eps = self.teacher(x, torch.zeros(x.shape[0], dtype=torch.long))
        return (x - (1 - self.acp[0]).sqrt() * eps) / self.acp[0].sqrt()

    # one distillation step --------------------------------------------------------------------------------------
    def draw_index(self, method: str, n0: int, g: torch.Generator, plan: list[int] | None, step: int) -> int:
        if method == "cd":
            return int(torch.randint(LAST_INDEX, n0, (), generator=g))
        if method == "cd+start":
            return int(torch.randint(LAST_INDEX, n0 + 1, (), generator=g))
        if method == "cd@std":
            return plan[step % len(plan)]
        raise ValueError(method)

    def distill_step(self, net, opt, method: str, eta: float, g: torch.Generator, bank=None, plan=None, step=0,
                     record=None) -> float:
        n0, window = start_index(eta), window_size(eta, self.rr)
        entry = bank.draw() if (bank is not None and method.startswith("std")) else None
        paper = method == "std-paper"  # STD with the paper's γ window (γ 0.7) instead of the official one
        if entry is not None:
            t = entry.tensors(bank.root)
            x, n, z0 = t["state"], entry.index, t["z0"]
        else:
            z0 = self.gmm.sample(self.batch, g)
            if method in ("std", "std-paper"):
                n = n0
            elif method == "std_nobank":  # a random depth of a fresh trajectory, recomputed from the start
                n = n0 - int(torch.randint(0, n0 - LAST_INDEX, (), generator=g))
            else:
                n = self.draw_index(method, n0, g, plan, step)
            start = n0 if method == "std_nobank" else n
            x = add_noise(z0, torch.randn(z0.shape, generator=g), self.grid.alpha(torch.full((self.batch,), start)))
            for m in range(start, n, -1):  # std_nobank only
                x = self.teacher_step(x, m)
        if record is not None:
            record.append(n)
        idx = torch.full((self.batch,), n)
        j = draw_target_index(idx, window, g, "paper" if paper else "official", 0.7, self.grid)
        a_s = self.grid.alpha_prev(j)
        with torch.no_grad():
            x_prev = self.teacher_step(x, n)
            if bank is not None and method in ("std", "std-paper"):
                bank.step(entry, n - 1, x_prev, {"z0": z0}, last_index=LAST_INDEX)
            prev = torch.full((self.batch,), n - 1)
            tg0, tge = x0_eps(net(x_prev, self.grid.timestep(prev)), x_prev, self.grid.alpha(prev))
            target = jump(tg0, tge, a_s)  # stop-gradient online target, as the official code
        s0, se = x0_eps(net(x, self.grid.timestep(idx)), x, self.grid.alpha(idx))
        loss = pseudo_huber(jump(s0, se, a_s), target, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def distill(self, method: str, eta: float, steps: int, plan: list[int] | None = None,
                record: list[int] | None = None) -> Score:
        """A student distilled with ``method``; returns its EMA weights (the evaluated network)."""
        net = copy.deepcopy(self.teacher).train().requires_grad_(True)
        ema = ema_copy(net.named_parameters())
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        g = torch.Generator().manual_seed(self.seed * 31 + int(eta * 100))
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            bank = (TrajectoryBank(tmp, capacity=4, rho=0.8, seed=self.seed) if method in ("std", "std-paper")
                    else None)
            for step in range(steps):
                self.distill_step(net, opt, method, eta, g, bank, plan, step, record)
                ema_update(ema, net.named_parameters(), self.ema)
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(ema[n])
        return net.eval().requires_grad_(False)

    # evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def start_and_reference(self, eta: float, nfe: int, n: int = 2000):
        g = torch.Generator().manual_seed(self.seed + 999)
        x0 = self.gmm.sample(n, g)
        noise = torch.randn(x0.shape, generator=g)
        plan = std_plan(nfe, eta, "trained_start")
        t0 = plan.timesteps[0]
        x_vp = self.acp[t0].sqrt() * x0 + (1 - self.acp[t0]).sqrt() * noise
        return x0, noise, plan, self.reference(x_vp, t0)

    @torch.no_grad()
    def endpoint_error(self, net, eta: float, nfe: int, cached=None) -> float:
        x0, noise, plan, ref = cached or self.start_and_reference(eta, nfe)
        sigmas = plan.sigmas(self.schedule)
        x_ve = x0 + sigmas[0] * noise  # VE coordinates of the core sampler, same noise as the reference
        denoiser = KDenoiser(lambda x, t: net(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0])), self.schedule)
        out = sample_std(denoiser, x_ve, sigmas, disable=True, gamma=0.0, schedule=self.schedule)
        return float((out - ref).norm(dim=1).mean())


def step_times(toy: Toy, eta: float = 0.75, repeats: int = 40) -> dict:
    """Median seconds per training step for each method, alternated in one run."""
    methods = ("std", "cd", "std_nobank")
    nets = {m: copy.deepcopy(toy.teacher).requires_grad_(True) for m in methods}
    opts = {m: torch.optim.Adam(nets[m].parameters(), lr=1e-4) for m in methods}
    g = torch.Generator().manual_seed(5)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    times = {m: [] for m in methods}
    n0 = start_index(eta)
    evals = {"std": 1.0, "cd": 1.0, "std_nobank": 1.0 + (n0 - LAST_INDEX - 1) / 2}  # mean depth + the step
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        bank = TrajectoryBank(tmp, capacity=4, rho=0.8, seed=0)
        for r in range(repeats + 5):
            for m in methods:
                start = time.perf_counter()
                toy.distill_step(nets[m], opts[m], m, eta, g, bank if m == "std" else None)
                if r >= 5:
                    times[m].append(time.perf_counter() - start)
    return {"median_s": {m: statistics.median(v) for m, v in times.items()}, "teacher_evals": evals}


def run(steps: int, seed: int = 0, batch: int = 1024, pretrain_steps: int = 300, lr: float = 1e-4,
        ema: float = 0.999, etas=None, nfes=None) -> tuple[list[tuple[float, int, dict]], Toy]:
    """(rows of (η, NFE, {method: error}), the toy) for every η and NFE (default :data:`ETAS` × :data:`NFES`); at
    η 0.75 also STD with the paper's γ window (``std-paper``)."""
    toy = Toy(seed, batch, pretrain_steps, lr, ema)
    rows = []
    for eta in etas or ETAS:
        record: list[int] = []
        students = {"std": toy.distill("std", eta, steps, record=record)}
        for m in METHODS[1:]:
            students[m] = toy.distill(m, eta, steps, plan=record)
        if abs(eta - 0.75) < 1e-9:
            students["std-paper"] = toy.distill("std-paper", eta, steps)
        for nfe in nfes or NFES:
            cached = toy.start_and_reference(eta, nfe)
            errs = {m: toy.endpoint_error(s, eta, nfe, cached) for m, s in students.items()}
            errs["base"] = toy.endpoint_error(toy.teacher, eta, nfe, cached)
            rows.append((eta, nfe, errs))
    return rows, toy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps per student")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="teacher regression steps (fewer: less exact)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the evaluated weights")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    rows, toy = run(args.steps, args.seed, args.batch, args.pretrain_steps, args.lr, args.ema)
    print("endpoint error vs the teacher's own many-step solution from the same noisy start (mean L2, 2000 held-out "
          "samples; lower is better)")
    print(f"{'eta':>5} {'NFE':>4} {'base':>8} " + " ".join(f"{m:>8}" for m in METHODS) + f" {'STD/base':>9}")
    for eta, nfe, e in rows:
        print(f"{eta:>5.2f} {nfe:>4d} {e['base']:>8.4f} " + " ".join(f"{e[m]:>8.4f}" for m in METHODS) +
              f" {e['std'] / e['base']:>9.3f}")
    cells = len(rows)
    for m in METHODS:
        print(f"{m}: below the base in {sum(e[m] < e['base'] for _, _, e in rows)}/{cells} cells")
    for m in METHODS[1:]:
        print(f"std below {m} in {sum(e['std'] < e[m] for _, _, e in rows)}/{cells} cells")
    for eta, nfe, e in rows:
        if "std-paper" in e:
            print(f"η {eta:.2f} NFE {nfe}: STD official window {e['std']:.4f}, paper γ 0.7 window {e['std-paper']:.4f}")
    t = step_times(toy)
    med, tev = t["median_s"], t["teacher_evals"]
    print(f"step time (median, alternated): STD+bank {med['std'] * 1e3:.2f} ms, CD {med['cd'] * 1e3:.2f} ms, "
          f"STD without bank {med['std_nobank'] * 1e3:.2f} ms; teacher evaluations per step {tev['std']:.0f} / "
          f"{tev['cd']:.0f} / {tev['std_nobank']:.1f} (η 0.75)")
    print(f"bank_step_time_ratio: {med['std'] / med['cd']:.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    e = next(e for eta, nfe, e in rows if abs(eta - 0.75) < 1e-9 and nfe == 4)
    print(f"std_toy_nfe4_error_vs_base: {e['std'] / e['base']:.3f}")


if __name__ == "__main__":
    main()
