"""STD's central claim on a CPU toy: single-trajectory distillation from partial noise beats consistency
distillation (CD) at few steps, and the trajectory bank makes it cost no more than CD per step.

Setup (all offline, minutes on a 2-core CPU):

* **Teacher**: an exact 2-D Gaussian mixture (8 modes on a ring): its ε-prediction under the SD schedule of the
  project is closed-form. Its PF-ODE "exact trajectory" is DDIM with 20 sub-steps per grid interval.
* **Students**: one MLP ε(x, t), pretrained by regression onto the exact ε (the "base model"), then distilled per
  η ∈ {0.65, 0.75, 0.85, 0.95} with the *same budget and hyperparameters* by
  - **STD**: the project's trajectory math and bank (:mod:`training.std.trajectory`, :class:`TrajectoryBank`):
    start at ``n0 = ceil(50 η)``, with probability ρ continue a trajectory from the bank, one teacher DDIM grid step
    per training step, student and stop-gradient target jump to ``s`` from the window, pseudo-Huber loss;
  - **CD** (LCM/PCM-style baseline): a fresh index ``n ~ U{1, …, n0 - 1}`` and fresh noising every step, the same
    teacher step, window, target and loss (std.md §2.3 "without STD").
  One bank entry holds a whole batch (its states, clean samples and index); its shards live on /dev/shm when
  available.
* **Evaluation**: held-out data noised to the first timestep of the project's inference plan
  (``std_plan(nfe, η, "trained_start")``), sampled by the core STD sampler (gamma 0) through ``KDenoiser``, and
  compared with the exact teacher ODE from the same noisy start: mean L2 endpoint error, NFE 2/4/8.
* **Step time**: median wall time per training step of STD with the bank, CD, and STD *without* a bank (a state at
  depth m along a single trajectory is recomputed with m teacher steps from the start every time), alternated in
  one run. The teacher here is analytic and cheap, so the no-bank overhead is also reported in teacher
  evaluations per step, the unit that dominates with a real UNet teacher.

    python -m training.std.toy [--steps 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from comfyui_std.core import DiscreteSchedule, KDenoiser, sample_std, std_plan
from training.common.toy import GMM, Score
from training.std.bank import TrajectoryBank
from training.std.trajectory import (LAST_INDEX, DDIMGrid, add_noise, draw_target_index, jump, pseudo_huber,
                                     start_index, window_size, x0_eps)

ETAS = (0.65, 0.75, 0.85, 0.95)
NFES = (2, 4, 8)


class Toy:
    def __init__(self, seed: int = 0, batch: int = 2048):
        self.gmm = GMM()
        self.schedule = DiscreteSchedule()
        self.grid = DDIMGrid(self.schedule)
        self.acp = self.schedule.alphas_cumprod
        self.batch = batch
        self.seed = seed

    # exact teacher ---------------------------------------------------------------------------------------------
    def teacher_eps(self, x, t):
        return self.gmm.eps(x, self.acp[t.long()])

    def ddim(self, x, t_from: int, t_to: int, eps_fn, substeps: int = 1):
        ts = torch.linspace(t_from, t_to, substeps + 1).round().long()
        for a, b in zip(ts[:-1], ts[1:]):
            ta = torch.full((x.shape[0],), int(a))
            eps = eps_fn(x, ta)
            aa, ab = self.acp[int(a)], self.acp[int(b)] if int(b) > 0 else self.acp[0]
            x0 = (x - (1 - aa).sqrt() * eps) / aa.sqrt()
            x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        return x

    def exact_endpoint(self, x, t_start: int):
        """The teacher's PF-ODE from (x, t_start) to t = 0 (DDIM, 20 sub-steps per grid interval), then x0."""
        steps = max(1, (t_start // 20) * 20)
        x = self.ddim(x, t_start, 0, self.teacher_eps, substeps=steps)
        eps = self.teacher_eps(x, torch.zeros(x.shape[0], dtype=torch.long))
        return (x - (1 - self.acp[0]).sqrt() * eps) / self.acp[0].sqrt()

    def teacher_step(self, x, n: int):
        """One CFG-free DDIM grid step τ_n -> τ_{n-1} of the exact teacher (what training uses)."""
        idx = torch.full((x.shape[0],), n)
        x0, eps = x0_eps(self.teacher_eps(x, self.grid.timestep(idx)), x, self.grid.alpha(idx))
        return jump(x0, eps, self.grid.alpha_prev(idx))

    # models ----------------------------------------------------------------------------------------------------
    def pretrained(self, steps: int = 1500) -> Score:
        """The "base model": an MLP regressed onto the exact ε at random t (what a real student starts from)."""
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
            loss = ((net(x, t) - self.teacher_eps(x, t)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net

    # one distillation step -------------------------------------------------------------------------------------
    def distill_step(self, net, target_net, opt, method: str, eta: float, g: torch.Generator, bank=None,
                     rr: float = 0.5):
        n0, window = start_index(eta), window_size(eta, rr)
        entry = bank.draw() if bank is not None else None
        if method == "std" and entry is not None:
            t = entry.tensors(bank.root)
            x, n, z0 = t["state"], entry.index, t["z0"]
        else:
            z0 = self.gmm.sample(self.batch, g)
            if method == "cd":
                n = int(torch.randint(LAST_INDEX + 1, n0, (), generator=g))
            elif method == "std_nobank":  # the state at a random depth of a fresh single trajectory, recomputed
                n = n0 - int(torch.randint(0, n0 - LAST_INDEX, (), generator=g))
            else:
                n = n0
            start = n0 if method == "std_nobank" else n
            x = add_noise(z0, torch.randn(z0.shape, generator=g), self.grid.alpha(torch.full((self.batch,), start)))
            for m in range(start, n, -1):  # m teacher steps from the start (std_nobank only)
                x = self.teacher_step(x, m)
        idx = torch.full((self.batch,), n)
        j = draw_target_index(idx, window, g)
        a_s = self.grid.alpha_prev(j)
        with torch.no_grad():
            x_prev = self.teacher_step(x, n)
            if bank is not None:
                bank.step(entry, n - 1, x_prev, {"z0": z0}, last_index=LAST_INDEX)
            prev = torch.full((self.batch,), n - 1)
            tg0, tge = x0_eps(target_net(x_prev, self.grid.timestep(prev)), x_prev, self.grid.alpha(prev))
            target = jump(tg0, tge, a_s)
        s0, se = x0_eps(net(x, self.grid.timestep(idx)), x, self.grid.alpha(idx))
        loss = pseudo_huber(jump(s0, se, a_s), target, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def distill(self, base: Score, method: str, eta: float, steps: int, lr: float = 5e-4) -> Score:
        import copy

        net = copy.deepcopy(base)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        g = torch.Generator().manual_seed(self.seed * 31 + int(eta * 100))
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            bank = TrajectoryBank(tmp, capacity=4, rho=0.8, seed=self.seed) if method == "std" else None
            for _ in range(steps):  # stop-gradient online target, as the official code
                self.distill_step(net, net, opt, method, eta, g, bank)
        return net

    # evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def endpoint_error(self, net, eta: float, nfe: int, n: int = 2000) -> float:
        g = torch.Generator().manual_seed(self.seed + 999)
        x0 = self.gmm.sample(n, g)
        noise = torch.randn(x0.shape, generator=g)
        plan = std_plan(nfe, eta, "trained_start")
        sigmas = plan.sigmas(self.schedule)
        x_ve = x0 + sigmas[0] * noise                      # VE coordinates of the core sampler
        t0 = plan.timesteps[0]
        x_vp = self.acp[t0].sqrt() * x0 + (1 - self.acp[t0]).sqrt() * noise
        exact = self.exact_endpoint(x_vp, t0)
        denoiser = KDenoiser(lambda x, t: net(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0])), self.schedule)
        student = sample_std(denoiser, x_ve, sigmas, disable=True, gamma=0.0, schedule=self.schedule)
        return float((student - exact).norm(dim=1).mean())


def step_times(toy: Toy, base: Score, eta: float = 0.75, repeats: int = 60) -> dict:
    """Median seconds per training step for each method, alternated in one run."""
    import copy

    nets = {m: copy.deepcopy(base) for m in ("std", "cd", "std_nobank")}
    opts = {m: torch.optim.Adam(nets[m].parameters(), lr=1e-4) for m in nets}
    g = torch.Generator().manual_seed(5)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    times = {m: [] for m in nets}
    teacher_evals = {"std": 1.0, "cd": 1.0}
    n0 = start_index(eta)
    teacher_evals["std_nobank"] = 1.0 + (n0 - LAST_INDEX - 1) / 2  # mean depth of a uniform state, plus the step
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        bank = TrajectoryBank(tmp, capacity=4, rho=0.8, seed=0)
        for _ in range(5):  # warm-up
            for m in nets:
                toy.distill_step(nets[m], nets[m], opts[m], m, eta, g, bank if m == "std" else None)
        for _ in range(repeats):
            for m in nets:
                start = time.perf_counter()
                toy.distill_step(nets[m], nets[m], opts[m], m, eta, g, bank if m == "std" else None)
                times[m].append(time.perf_counter() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"median_s": med, "teacher_evals": teacher_evals}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps per student")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2048)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    toy = Toy(args.seed, args.batch)
    base = toy.pretrained(args.pretrain_steps)
    rows = []
    for eta in ETAS:
        students = {m: toy.distill(base, m, eta, args.steps) for m in ("std", "cd")}
        for nfe in NFES:
            errs = {m: toy.endpoint_error(students[m], eta, nfe) for m in students}
            errs["base"] = toy.endpoint_error(base, eta, nfe)
            rows.append((eta, nfe, errs))
    print("endpoint error vs the exact teacher ODE (mean L2, 2000 held-out samples; lower is better)")
    print(f"{'eta':>5} {'NFE':>4} {'base':>8} {'CD':>8} {'STD':>8} {'STD/CD':>7}")
    for eta, nfe, e in rows:
        print(f"{eta:>5.2f} {nfe:>4d} {e['base']:>8.4f} {e['cd']:>8.4f} {e['std']:>8.4f} {e['std'] / e['cd']:>7.3f}")
    wins = sum(e["std"] < e["cd"] for _, _, e in rows)
    t = step_times(toy, base)
    med, tev = t["median_s"], t["teacher_evals"]
    print(f"step time (median of 60, alternated): STD+bank {med['std'] * 1e3:.2f} ms, CD {med['cd'] * 1e3:.2f} ms, "
          f"STD without bank {med['std_nobank'] * 1e3:.2f} ms")
    print(f"teacher evaluations per step: STD+bank {tev['std']:.1f}, CD {tev['cd']:.1f}, "
          f"STD without bank {tev['std_nobank']:.1f} (η 0.75)")
    print(f"total {time.perf_counter() - start:.0f} s")
    for eta, nfe, e in rows:
        if nfe == 4:
            print(f"std_vs_cd_error_ratio_nfe4_eta{eta:.2f}: {e['std'] / e['cd']:.3f}")
    print(f"std_wins_over_cd: {wins}/{len(rows)}")
    print(f"nobank_teacher_evals_ratio: {tev['std_nobank'] / tev['std']:.2f}")
    print(f"nobank_step_time_ratio: {med['std_nobank'] / med['cd']:.2f}")
    print(f"bank_step_time_ratio: {med['std'] / med['cd']:.3f}")


if __name__ == "__main__":
    main()
