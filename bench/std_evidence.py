"""Does STD's trajectory bank beat consistency distillation? A controlled CPU experiment that can answer either way.

STD's claim: a teacher with classifier-free guidance, run from partially noised content of another domain, visits
states along its trajectory that forward-noised content never shows; consistency distillation (CD) trains on the
forward-noised states, STD on the teacher's own trajectory states (kept in the trajectory bank), so with a student
of scarce capacity STD should spend it where few-step inference goes.

Design (every piece at equal budget across the three students):

* **Data**: scikit-learn's bundled 8×8 digits (64 dimensions, pixels in [-1, 1]), split once: half for the teacher,
  a quarter as training content, a quarter as held-out content for evaluation. The **style** domain is a fixed
  transform of a digit (horizontal stroke dilation, then inversion).
* **Teacher**: a class-conditional ε-MLP on the 1000-step scaled-linear DDPM schedule, trained on the style domain
  with label dropout (the null class is the unconditional branch); sampled with LCM-form CFG
  (:func:`training.std.trajectory.cfg_lcm`), ``w`` drawn per trajectory.
* **Students**: the teacher plus a rank-4 LoRA on every linear layer (base frozen), all with the trainer's own
  trajectory math (:mod:`training.std.trajectory`: DDIM grid, start index ``ceil(50 η)``, official target window,
  DDIM jump, pseudo-Huber c = 1e-3, stop-gradient online target) and the same steps, batch, Adam learning rate and
  an EMA with bias correction (the EMA is evaluated; the raw weights are reported too):

  - ``std``: :class:`training.std.trajectory_bank.TrajectoryBank` (ρ 0.8) -- per sample a bank trajectory continued
    one CFG'd teacher step, or a fresh start from training content noised to ``τ_{n0}``;
  - ``cd``: training content forward-noised at ``n ~ U{1 … n0 - 1}`` (the official code without STD);
  - ``cd@std``: forward-noised at exactly the per-sample indices the ``std`` run trained at, so the only difference
    from ``std`` is trajectory states versus forward-noised states.
* **Settings**: ``test`` (plain content into the style teacher, CFG w ~ U[2, 6]) and ``control`` (content from the
  style domain, no CFG: w = 0). η ∈ {0.6, 0.8}; seeds 0, 1, 2 (teacher, LoRA init, noise); NFE 2 / 4 / 8 with the
  core STD sampler (``sample_std``, gamma 0) on the ``trained_start`` plan.
* **Metrics** on the held-out content, noised once to the plan's start: L2 to the teacher's 200-step DDIM output from
  the same noisy start (CFG at the middle of the w range); an RBF-kernel MMD² (×100) to those teacher outputs; a
  style score (a logistic-regression classifier, style vs plain domain: mean probability of style); content kept (a
  digit classifier trained on the style domain agrees with the input's label). ``base`` is the teacher itself with
  CFG at the same few steps.

Registered before any result (printed before training starts):

* **Mismatch** ``r_n`` = the trained ``cd`` student's (EMA) own consistency loss on the teacher's trajectory states
  at grid index n (trajectories from held-out content, the setting's w), over its loss on forward-noised held-out
  content at the same n, with the same target levels; for n = 2 … n0 - 1. Per setting and η, ``r`` = the mean over
  seeds of the median over n.
* **Verdict** (the pure function :func:`verdict`, on the L2 of the EMA students at NFE 2 and 4; "A beats B" = the
  mean over seeds of the paired difference L2(B) - L2(A) exceeds two standard errors of that difference):

  - **supported** where every ``test`` (η, NFE) cell with r ≥ 1.3 has ``std`` beating both ``cd`` and ``cd@std``,
    and the controls hold: every ``control`` cell has r < 1.3 and ``std`` ties ``cd@std`` (|mean| ≤ 2 SE);
  - **refuted** where ``test`` cells with r ≥ 1.3 exist and in none of them does ``std`` beat ``cd@std`` (any gain
    over plain ``cd`` is then index weighting, not trajectory states);
  - **inconclusive** otherwise (no cell with r ≥ 1.3, mixed outcomes, or controls that do not tie).

The last line is ``std_over_cd_at_std_indices_nfe4: X ± SE``: the ``test`` setting's L2 of ``std`` over ``cd@std``
at NFE 4 (EMA weights), averaged over η per seed, mean ± standard error over seeds (< 1: STD better).

    python bench/std_evidence.py [--smoke] [--workers 2]

Runs in two worker processes of one thread each: about 530 CPU-seconds, some 5 minutes on a 2-core CPU of its own
(13.7 minutes on a 2-core machine shared with other jobs); ``--smoke`` runs the same code with tiny budgets in
seconds (tests/test_std_evidence.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comfyui_std.core import DiscreteSchedule, KDenoiser, sample_std, std_plan  # noqa: E402
from comfyui_std.core.vp import add_noise, guidance, x0_eps  # noqa: E402
from training.common.ema import ema_update, swapped  # noqa: E402
from training.std.trajectory import (LAST_INDEX, DDIMGrid, cfg_lcm, draw_target_index, jump,  # noqa: E402
                                     pseudo_huber, start_index, window_size)
from training.std.trajectory_bank import TrajectoryBank  # noqa: E402

ETAS = (0.6, 0.8)
NFES = (2, 4, 8)
METHODS = ("std", "cd", "cd@std")
NULL_CLASS = 10
R_THRESHOLD = 1.3
Z = 2.0  # standard errors
LAST_LINE = "std_over_cd_at_std_indices_nfe4"


@dataclass(frozen=True)
class Setting:
    content: str            # "plain" (another domain than the teacher's) or "style" (the teacher's own)
    w_range: tuple[float, float]

    @property
    def w_eval(self) -> float:
        return sum(self.w_range) / 2


SETTINGS = {"test": Setting("plain", (2.0, 6.0)), "control": Setting("style", (0.0, 0.0))}


@dataclass(frozen=True)
class Budget:
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_steps: int = 2500
    teacher_batch: int = 256
    steps: int = 1000          # distillation steps per student
    batch: int = 32
    lr: float = 1e-3
    ema: float = 0.995
    rank: int = 4
    width: int = 256
    ref_steps: int = 200       # the teacher's many-step reference
    n_eval: int = 0            # held-out content used (0: all)


FULL = Budget()
SMOKE = Budget(seeds=(0, 1), teacher_steps=30, teacher_batch=64, steps=6, batch=8, ref_steps=8, width=64, n_eval=64)


# -- data -------------------------------------------------------------------------------------------------------------
def stylise(x: torch.Tensor) -> torch.Tensor:
    """The style domain: strokes dilated horizontally (1×3 max), then inverted."""
    img = nn.functional.pad(x.view(-1, 8, 8), (1, 1), value=-1.0)
    return -torch.stack([img[..., :-2], img[..., 1:-1], img[..., 2:]]).amax(0).reshape(-1, 64)


def load_data() -> dict[str, torch.Tensor]:
    """Digits in [-1, 1] split (fixed permutation) into teacher / content-train / content-test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 8.0 - 1.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    a, b = len(x) // 2, 3 * len(x) // 4
    parts = {"teacher": perm[:a], "train": perm[a:b], "test": perm[b:]}
    return {f"{k}_{v}": t[idx] for k, idx in parts.items() for v, t in (("x", x), ("y", y))}


def content(data: dict, setting: Setting, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = data[f"{split}_x"]
    return (stylise(x) if setting.content == "style" else x), data[f"{split}_y"]


# -- networks ---------------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


class EpsNet(nn.Module):
    """ε(x_t, t, class) for 64-D images: residual MLP, class NULL_CLASS is the unconditional branch."""

    def __init__(self, width: int = 256, blocks: int = 2):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.temb = nn.Linear(64, width)
        self.cemb = nn.Embedding(NULL_CLASS + 1, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 64))

    def forward(self, x, t, y):
        h = self.inp(x) + self.temb(timestep_embedding(t.reshape(-1).expand(x.shape[0]))) + self.cemb(y)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class LoRALinear(nn.Module):
    """A frozen linear layer plus ``up @ down`` (rank r, scale alpha / r), initialised as the trainer's adapters:
    ``down ~ N(0, 1/r²)``, ``up = 0``."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / rank)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = (alpha or rank) / rank

    def forward(self, x):
        return self.base(x) + (x @ self.down.T) @ self.up.T * self.scale


def with_lora(teacher: EpsNet, rank: int, seed: int) -> tuple[EpsNet, list[tuple[str, nn.Parameter]]]:
    """The student: a copy of the teacher with a LoRA on every linear layer; returns it and its trainable params."""
    student = copy.deepcopy(teacher).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    linears = [(name, m) for name, m in student.named_modules() if isinstance(m, nn.Linear)]
    for name, module in linears:
        parent, _, leaf = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, leaf, LoRALinear(module, rank, g))
    return student, [(n, p) for n, p in student.named_parameters() if p.requires_grad]


def train_teacher(x: torch.Tensor, y: torch.Tensor, budget: Budget, seed: int) -> dict:
    """ε-regression on the style domain with 10 % label dropout; returns the state dict."""
    torch.manual_seed(seed)
    net = EpsNet(budget.width)
    acp = DiscreteSchedule().alphas_cumprod
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, budget.teacher_steps)
    g = torch.Generator().manual_seed(seed + 101)
    for _ in range(budget.teacher_steps):
        i = torch.randint(len(x), (budget.teacher_batch,), generator=g)
        t = torch.randint(0, 1000, (len(i),), generator=g)
        noise = torch.randn(len(i), 64, generator=g)
        label = torch.where(torch.rand(len(i), generator=g) < 0.1, NULL_CLASS, y[i])
        loss = (net(add_noise(x[i], noise, acp[t]), t, label) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.state_dict()


def cond_uncond(net, x, t, y):
    """ε of the label and of the null class in one batched call."""
    t = t.reshape(-1).expand(x.shape[0])
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)]))
    return out.chunk(2)


# -- the teacher step and one distillation step (the trainer's micro-step on a 64-D model) ----------------------------
@torch.no_grad()
def teacher_step(teacher, grid: DDIMGrid, x, n, y, w):
    """One CFG'd (LCM form, scale 1 + w) DDIM grid step τ_n -> τ_{n-1}."""
    a = grid.alpha(n)
    eps_c, eps_u = cond_uncond(teacher, x, grid.timestep(n), y)
    x0, eps = cfg_lcm(x0_eps(eps_c, x, a), x0_eps(eps_u, x, a), w)
    return jump(x0, eps, grid.alpha_prev(n))


def consistency(student, grid: DDIMGrid, x, n, x_prev, y, j):
    """(student jump from (x_n, τ_n) to s, stop-gradient jump from (x_{n-1}, τ_{n-1}) to the same s = τ_{j-1})."""
    a_s = grid.alpha_prev(j)
    with torch.no_grad():
        target = jump(*x0_eps(student(x_prev, grid.timestep(n - 1), y), x_prev, grid.alpha(n - 1)), a_s)
    return jump(*x0_eps(student(x, grid.timestep(n), y), x, grid.alpha(n)), a_s), target


def distill_step(student, teacher, grid, opt, batch: dict, window: int, gen) -> torch.Tensor:
    """One step of every method: the teacher's next state, the consistency loss, an Adam step; returns x_{n-1}."""
    x, n, y, w = batch["x"], batch["n"], batch["y"], batch["w"]
    j = draw_target_index(n, window, gen, "official", grid=grid)
    x_prev = teacher_step(teacher, grid, x, n, y, w)
    pred, target = consistency(student, grid, x, n, x_prev, y, j)
    loss = pseudo_huber(pred, target, 1e-3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return x_prev


# -- where each method's training states come from --------------------------------------------------------------------
class BankStates:
    """STD: per sample a trajectory continued from the bank, or a fresh start at n0 (kept in the bank)."""

    def __init__(self, root: str, grid, x, y, n0: int, setting: Setting, batch: int, seed: int):
        self.root, self.grid, self.x, self.y, self.n0, self.setting = root, grid, x, y, n0, setting
        self.bank = TrajectoryBank(root, capacity=2 * batch, rho=0.8, seed=seed)
        self.batch = batch
        self.entries = []

    def draw(self, step: int, gen) -> dict:
        self.entries = self.bank.draw_batch(self.batch)
        rows = [self._restore(e) if e is not None else self._fresh(gen) for e in self.entries]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _restore(self, entry) -> dict:
        t = entry.tensors(Path(self.root))
        return dict(x=t["state"], n=torch.tensor(entry.index), y=t["y"].long(), w=torch.tensor(entry.w), z0=t["z0"])

    def _fresh(self, gen) -> dict:
        i = int(torch.randint(len(self.x), (), generator=gen))
        noise = torch.randn(64, generator=gen)
        lo, hi = self.setting.w_range
        w = lo + (hi - lo) * torch.rand((), generator=gen)
        x = add_noise(self.x[i], noise, self.grid.alpha(torch.tensor(self.n0)))
        return dict(x=x, n=torch.tensor(self.n0), y=self.y[i], w=w, z0=self.x[i])

    def advance(self, batch: dict, x_prev: torch.Tensor) -> None:
        for k, entry in enumerate(self.entries):  # advance / retire / keep: the context travels with the state
            ctx = None if entry is not None else {"z0": batch["z0"][k], "y": batch["y"][k]}
            self.bank.step(entry, int(batch["n"][k]) - 1, x_prev[k], ctx, w=float(batch["w"][k]),
                           last_index=LAST_INDEX)


class ForwardStates:
    """CD: content forward-noised at n ~ U{1 … n0 - 1}, or at the indices of a recorded STD run (``plan``)."""

    def __init__(self, grid, x, y, n0: int, setting: Setting, batch: int, plan: list | None = None):
        self.grid, self.x, self.y, self.n0, self.setting, self.batch, self.plan = grid, x, y, n0, setting, batch, plan

    def draw(self, step: int, gen) -> dict:
        i = torch.randint(len(self.x), (self.batch,), generator=gen)
        if self.plan is None:
            n = torch.randint(LAST_INDEX, self.n0, (self.batch,), generator=gen)
        else:
            n = self.plan[step]
        lo, hi = self.setting.w_range
        w = lo + (hi - lo) * torch.rand(self.batch, generator=gen)
        x = add_noise(self.x[i], torch.randn(self.batch, 64, generator=gen), self.grid.alpha(n))
        return dict(x=x, n=n, y=self.y[i], w=w)

    def advance(self, batch: dict, x_prev: torch.Tensor) -> None:
        pass


def distill(teacher, states, eta: float, budget: Budget, seed: int, record: list | None = None):
    """A LoRA student trained on ``states``; returns (student, its params, bias-corrected EMA of the params)."""
    grid = DDIMGrid()
    student, params = with_lora(teacher, budget.rank, seed)
    opt = torch.optim.Adam([p for _, p in params], lr=budget.lr)
    ema = {n: torch.zeros_like(p) for n, p in params}
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    window = window_size(eta, 0.5)
    for step in range(budget.steps):
        batch = states.draw(step, gen)
        if record is not None:
            record.append(batch["n"].clone())
        x_prev = distill_step(student, teacher, grid, opt, batch, window, gen)
        states.advance(batch, x_prev)
        ema_update(ema, params, budget.ema)
    correction = 1 - budget.ema ** budget.steps
    return student, params, {n: v / correction for n, v in ema.items()}


# -- evaluation -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(net, x0, y, sigmas, noise, w: float | None = None):
    """The core STD sampler (gamma 0) from x0 noised to sigmas[0]; ``w``: the teacher with LCM-form CFG."""
    schedule = DiscreteSchedule()

    def eps_fn(x_vp, t):
        t = torch.as_tensor(t).reshape(-1).expand(x_vp.shape[0])
        if w is None:
            return net(x_vp, t, y)
        cond, uncond = cond_uncond(net, x_vp, t, y)
        return guidance(uncond, cond, 1 + w)  # the ε of cfg_lcm

    return sample_std(KDenoiser(eps_fn, schedule), x0 + sigmas[0] * noise, sigmas, disable=True, gamma=0.0,
                      schedule=schedule)


def reference_sigmas(t0: int, steps: int) -> torch.Tensor:
    """``steps`` DDIM levels from t0 down to 0 (then σ = 0: the sampler returns the last x̂0)."""
    schedule = DiscreteSchedule()
    ts = torch.linspace(t0, 0, steps).round()
    return torch.cat([schedule.sigma(ts).float(), torch.zeros(1)])


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """Unbiased RBF-kernel MMD² between two samples."""
    def k(u, v):
        return torch.exp(-torch.cdist(u, v).square() / (2 * bandwidth ** 2))
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m, n = len(a), len(b)
    return float((kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
                 - 2 * kab.mean())


@dataclass
class Scorer:
    """Metrics of outputs against the teacher's many-step outputs from the same starts."""
    reference: torch.Tensor
    labels: torch.Tensor
    style_clf: object
    digit_clf: object
    bandwidth: float = field(init=False)

    def __post_init__(self):
        self.bandwidth = float(torch.cdist(self.reference, self.reference).median())

    def __call__(self, out: torch.Tensor) -> dict:
        clipped = out.clamp(-1, 1).numpy()
        return {"l2": float((out - self.reference).norm(dim=1).mean()),
                "mmd": 100 * mmd2(out, self.reference, self.bandwidth),
                "style": float(self.style_clf.predict_proba(clipped)[:, 1].mean()),
                "content": float((self.digit_clf.predict(clipped) == self.labels.numpy()).mean())}


@torch.no_grad()
def mismatch(student, teacher, x, y, setting: Setting, eta: float, seed: int) -> dict[int, float]:
    """r_n: the student's consistency loss on the teacher's trajectory states over forward-noised states at n."""
    grid, n0, window = DDIMGrid(), start_index(eta), window_size(eta, 0.5)
    g = torch.Generator().manual_seed(seed + 555)
    lo, hi = setting.w_range
    w = lo + (hi - lo) * torch.rand(len(x), generator=g)
    state = add_noise(x, torch.randn(x.shape, generator=g), grid.alpha(torch.tensor(n0)))
    ratios = {}
    for n in range(n0, LAST_INDEX, -1):
        idx = torch.full((len(x),), n)
        if n < n0:
            fwd = add_noise(x, torch.randn(x.shape, generator=g), grid.alpha(idx))
            j = draw_target_index(idx, window, g, "official", grid=grid)
            ratios[n] = own_loss(student, teacher, grid, state, idx, y, w, j) / own_loss(
                student, teacher, grid, fwd, idx, y, w, j)
        state = teacher_step(teacher, grid, state, idx, y, w)
    return ratios


def own_loss(student, teacher, grid, x, n, y, w, j) -> float:
    pred, target = consistency(student, grid, x, n, teacher_step(teacher, grid, x, n, y, w), y, j)
    return float(pseudo_huber(pred, target, 1e-3))


# -- one job: a seed's teacher; one cell: (seed, setting, η) with its three students ---------------------------------
def teacher_job(seed: int, budget: Budget, data: dict) -> dict:
    torch.set_num_threads(1)
    return train_teacher(stylise(data["teacher_x"]), data["teacher_y"], budget, seed)


def cell_job(seed: int, setting_name: str, eta: float, budget: Budget, data: dict, teacher_state: dict,
             classifiers: tuple) -> dict:
    """Train std, cd and cd@std for one (seed, setting, η); score them (EMA and raw) and the base at every NFE."""
    torch.set_num_threads(1)
    setting = SETTINGS[setting_name]
    teacher = EpsNet(budget.width)
    teacher.load_state_dict(teacher_state)
    teacher.requires_grad_(False).eval()
    grid, n0 = DDIMGrid(), start_index(eta)
    train_x, train_y = content(data, setting, "train")
    students, record = {}, []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as root:
        states = BankStates(root, grid, train_x, train_y, n0, setting, budget.batch, seed)
        students["std"] = distill(teacher, states, eta, budget, seed, record)
    students["cd"] = distill(teacher, ForwardStates(grid, train_x, train_y, n0, setting, budget.batch), eta,
                             budget, seed)
    students["cd@std"] = distill(teacher, ForwardStates(grid, train_x, train_y, n0, setting, budget.batch,
                                                        record), eta, budget, seed)
    test_x, test_y = content(data, setting, "test")
    if budget.n_eval:
        test_x, test_y = test_x[:budget.n_eval], test_y[:budget.n_eval]
    noise = torch.randn(test_x.shape, generator=torch.Generator().manual_seed(seed + 999))
    t0 = std_plan(NFES[0], eta, "trained_start").timesteps[0]
    reference = sample(teacher, test_x, test_y, reference_sigmas(t0, budget.ref_steps), noise, setting.w_eval)
    score = Scorer(reference, test_y, *classifiers)
    out = {"teacher": score(reference) | {"l2": 0.0}, "metrics": {}, "indices": torch.cat(record).tolist()}
    for nfe in NFES:
        sig = std_plan(nfe, eta, "trained_start").sigmas(DiscreteSchedule())
        out["metrics"][("base", "raw", nfe)] = score(sample(teacher, test_x, test_y, sig, noise, setting.w_eval))
        for m, (student, params, ema) in students.items():
            out["metrics"][(m, "raw", nfe)] = score(sample(student, test_x, test_y, sig, noise))
            with swapped(params, ema):
                out["metrics"][(m, "ema", nfe)] = score(sample(student, test_x, test_y, sig, noise))
    student, params, ema = students["cd"]
    with swapped(params, ema):
        out["r_n"] = mismatch(student, teacher, test_x, test_y, setting, eta, seed)
    return out


def fit_classifiers(data: dict) -> tuple:
    """Style (style vs plain domain) and digit (on the style domain) logistic regressions, on the teacher split."""
    from sklearn.linear_model import LogisticRegression

    plain, styled = data["teacher_x"].numpy(), stylise(data["teacher_x"]).numpy()
    style = LogisticRegression(max_iter=2000).fit(np.concatenate([plain, styled]),
                                                   np.r_[np.zeros(len(plain)), np.ones(len(styled))])
    digit = LogisticRegression(max_iter=5000).fit(styled, data["teacher_y"].numpy())
    return style, digit


def run(budget: Budget, workers: int) -> dict:
    """Every job in ``workers`` processes (one thread each); results keyed by (seed, setting, η). The classifiers
    are fitted here while the workers train the teachers; each teacher's cells start as soon as it is done."""
    data = load_data()
    results = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        teachers = {pool.submit(teacher_job, s, budget, data): s for s in budget.seeds}
        classifiers = fit_classifiers(data)
        cells = {}
        for fut in as_completed(teachers):
            for name in SETTINGS:
                for eta in ETAS:
                    key = (teachers[fut], name, eta)
                    cells[pool.submit(cell_job, *key, budget, data, fut.result(), classifiers)] = key
        for fut in as_completed(cells):
            results[cells[fut]] = fut.result()
    return results


# -- statistics and the registered verdict ----------------------------------------------------------------------------
def mean_se(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    if len(values) < 2:
        return values[0], float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def beats(a: list[float], b: list[float], z: float = Z) -> bool:
    """Paired over seeds: is a (an error) lower than b by more than z standard errors of the difference?"""
    m, se = mean_se([y - x for x, y in zip(a, b)])
    return m > z * (0.0 if math.isnan(se) else se)


def ties(a: list[float], b: list[float], z: float = Z) -> bool:
    m, se = mean_se([y - x for x, y in zip(a, b)])
    return abs(m) <= z * (0.0 if math.isnan(se) else se)


def outcome(a: list[float], b: list[float]) -> str:
    return "wins" if beats(a, b) else "loses" if beats(b, a) else "ties"


@dataclass(frozen=True)
class Cell:
    """One (setting, η, NFE): the mismatch r and the per-seed L2 of each student (paired by seed)."""
    setting: str
    eta: float
    nfe: int
    r: float
    l2: dict


def verdict(cells: list[Cell], threshold: float = R_THRESHOLD) -> tuple[str, str]:
    """The registered rule (module docstring) on NFE 2–4 cells: ("supported" | "refuted" | "inconclusive", why)."""
    cells = [c for c in cells if c.nfe in (2, 4)]
    tested = [c for c in cells if c.setting == "test" and c.r >= threshold]
    controls = [c for c in cells if c.setting == "control"]
    if not tested:
        return "inconclusive", f"no test cell reaches r >= {threshold}: the mismatch the claim rests on is absent"
    wins = [beats(c.l2["std"], c.l2["cd"]) and beats(c.l2["std"], c.l2["cd@std"]) for c in tested]
    vs_index = [beats(c.l2["std"], c.l2["cd@std"]) for c in tested]
    controls_hold = all(c.r < threshold and ties(c.l2["std"], c.l2["cd@std"]) for c in controls)
    if all(wins) and controls_hold:
        return "supported", (f"in all {len(tested)} test cells with r >= {threshold} STD beats CD and CD at STD's "
                             "indices by more than 2 SE, and the controls tie")
    if not any(vs_index):
        return "refuted", (f"in none of the {len(tested)} test cells with r >= {threshold} does STD beat CD at STD's "
                           "own indices by more than 2 SE")
    why = "the controls do not tie" if all(wins) else f"STD wins in {sum(wins)} of {len(tested)} tested cells"
    return "inconclusive", why


def cells_from(results: dict, budget: Budget) -> tuple[list[Cell], dict]:
    """Cells of the verdict (EMA L2) and the r per (setting, η) (mean over seeds of the median over n)."""
    r = {}
    for name in SETTINGS:
        for eta in ETAS:
            r[name, eta] = statistics.fmean(statistics.median(results[s, name, eta]["r_n"].values())
                                            for s in budget.seeds)
    cells = [Cell(name, eta, nfe, r[name, eta],
                  {m: [results[s, name, eta]["metrics"][m, "ema", nfe]["l2"] for s in budget.seeds] for m in METHODS})
             for name in SETTINGS for eta in ETAS for nfe in NFES]
    return cells, r


TITLES = {"l2": "L2 to the teacher's many-step output from the same start (lower is better)",
          "mmd": "MMD² ×100 to the teacher's many-step outputs (lower is better)",
          "style": "style score: mean P(style domain)",
          "content": "content kept: digit classifier agrees with the label"}


# -- report -----------------------------------------------------------------------------------------------------------
def fmt(values, digits: int = 3) -> str:
    m, se = mean_se(values)
    return f"{m:.{digits}f}±{se:.{digits}f}"


def print_registration(budget: Budget) -> None:
    print("registered before any result:")
    print("  mismatch r_n = the trained CD student's consistency loss on teacher-trajectory states / on "
          "forward-noised states, n = 2 … n0-1; r = mean over seeds of the median over n")
    print(f"  supported: every test cell (NFE 2-4) with r >= {R_THRESHOLD}: STD beats CD and CD@STD by > {Z:g} SE "
          f"(paired over seeds, EMA L2), and controls have r < {R_THRESHOLD} and STD ties CD@STD")
    print(f"  refuted: test cells with r >= {R_THRESHOLD} exist and in none does STD beat CD@STD by > {Z:g} SE")
    print("  inconclusive: otherwise")
    print(f"budget: seeds {list(budget.seeds)}, teacher {budget.teacher_steps} steps, students {budget.steps} steps "
          f"× batch {budget.batch}, Adam {budget.lr:g}, EMA {budget.ema} (bias-corrected), LoRA rank {budget.rank}, "
          f"width {budget.width}; reference {budget.ref_steps} DDIM steps", flush=True)


def metric_table(results: dict, budget: Budget, metric: str, weights: str, digits: int = 3) -> None:
    print(f"\n{TITLES[metric]} ({weights} weights; mean±SE over {len(budget.seeds)} seeds)")
    print(f"{'setting':>8} {'eta':>4} {'NFE':>3} {'base':>13} " + " ".join(f"{m:>13}" for m in METHODS))
    for name in SETTINGS:
        for eta in ETAS:
            for nfe in NFES:
                row = [fmt([results[s, name, eta]["metrics"][m, w, nfe][metric] for s in budget.seeds], digits)
                       for m, w in [("base", "raw")] + [(m, weights) for m in METHODS]]
                print(f"{name:>8} {eta:>4} {nfe:>3} " + " ".join(f"{v:>13}" for v in row))


def report(results: dict, budget: Budget) -> tuple[float, float]:
    metric_table(results, budget, "l2", "ema")
    metric_table(results, budget, "l2", "raw")
    for metric in ("mmd", "style", "content"):
        metric_table(results, budget, metric, "ema")
    print("\nthe teacher's own outputs (reference): " + ", ".join(
        f"{name} η {eta}: style {fmt([results[s, name, eta]['teacher']['style'] for s in budget.seeds], 2)}, "
        f"content {fmt([results[s, name, eta]['teacher']['content'] for s in budget.seeds], 2)}"
        for name in SETTINGS for eta in ETAS))
    cells, r = cells_from(results, budget)
    print("\nmismatch r_n (CD student, EMA; mean over seeds), n from n0-1 down to 2:")
    for name in SETTINGS:
        for eta in ETAS:
            per_n = {n: statistics.fmean(results[s, name, eta]["r_n"][n] for s in budget.seeds)
                     for n in results[budget.seeds[0], name, eta]["r_n"]}
            print(f"  {name} η {eta}: r = {r[name, eta]:.2f}; r_n " + " ".join(f"{v:.2f}" for v in per_n.values()))
    print("\nSTD index share (std run): " + ", ".join(
        f"η {eta}: {share_at_start(results, budget, eta):.0%} at n0" for eta in ETAS))
    word, why = verdict(cells)
    print(f"\nverdict: {word.upper()}: {why}")
    for c in cells:
        if c.nfe in (2, 4):
            d1, d2 = ([b - a for a, b in zip(c.l2["std"], c.l2[m])] for m in ("cd", "cd@std"))
            print(f"  {c.setting} η {c.eta} NFE {c.nfe}: r {c.r:.2f}; L2(CD) - L2(STD) {fmt(d1, 4)}, "
                  f"L2(CD@STD) - L2(STD) {fmt(d2, 4)}; STD vs CD@STD: {outcome(c.l2['std'], c.l2['cd@std'])}")
    ratios = [statistics.fmean(results[s, "test", eta]["metrics"]["std", "ema", 4]["l2"] /
                               results[s, "test", eta]["metrics"]["cd@std", "ema", 4]["l2"] for eta in ETAS)
              for s in budget.seeds]
    return mean_se(ratios)


def share_at_start(results: dict, budget: Budget, eta: float) -> float:
    n0 = start_index(eta)
    idx = [i for s in budget.seeds for i in results[s, "test", eta]["indices"]]
    return sum(i == n0 for i in idx) / len(idx)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budgets, the same code (seconds)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = ap.parse_args(argv)
    budget = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    print_registration(budget)
    results = run(budget, max(1, args.workers))
    m, se = report(results, budget)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, {args.workers} worker process(es), {os.cpu_count()} CPU(s)")
    print(f"{LAST_LINE}: {m:.3f} ± {se:.3f}")


if __name__ == "__main__":
    main()
