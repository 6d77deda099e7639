"""The STD toy with tiny budgets: the teacher is imperfect (its trajectories leave the forward marginals, the effect
STD targets), its many-step reference is converged, every method trains with the project's trajectory code, and
the report ends in ``name: value`` lines."""

import re

import torch

import training.std.toy as toy_mod
from training.common.toy import sliced_wasserstein
from training.std.toy import METHODS, Toy, main, step_times


def test_the_teacher_is_imperfect_and_its_reference_is_converged():
    toy = Toy(batch=512, pretrain_steps=150)
    g = torch.Generator().manual_seed(0)
    x0 = toy.gmm.sample(3000, g)
    a38, a2 = toy.grid.alpha(torch.tensor([38])), toy.grid.alpha(torch.tensor([2]))
    x = a38.sqrt() * x0 + (1 - a38).sqrt() * torch.randn(x0.shape, generator=g)
    for n in range(38, 2, -1):  # the teacher's own trajectory from the partially noised start down to τ_2
        x = toy.teacher_step(x, n)
    forward = a2.sqrt() * toy.gmm.sample(3000, g) + (1 - a2).sqrt() * torch.randn(x0.shape, generator=g)
    forward2 = a2.sqrt() * toy.gmm.sample(3000, g) + (1 - a2).sqrt() * torch.randn(x0.shape, generator=g)
    assert sliced_wasserstein(x, forward) > 3 * sliced_wasserstein(forward2, forward)
    start = x0[:500] + 0  # VP start at t 779
    start = a38.sqrt() * start + (1 - a38).sqrt() * torch.randn(start.shape, generator=g)
    fine, coarse = toy.reference(start, 779, substeps=20), toy.reference(start, 779, substeps=60)
    assert (fine - coarse).norm(dim=1).mean() < 0.02


def test_every_method_distils_with_the_bank_and_the_index_plan():
    toy = Toy(batch=128, pretrain_steps=60)
    record = []
    students = {"std": toy.distill("std", 0.75, 20, record=record)}
    assert len(record) == 20 and record[0] == 38 and min(record) < 38  # fresh starts, then bank states
    for m in METHODS[1:]:
        students[m] = toy.distill(m, 0.75, 20, plan=record)
    cached = toy.start_and_reference(0.75, 4)
    errs = {m: toy.endpoint_error(s, 0.75, 4, cached) for m, s in students.items()}
    assert all(0 < e < 10 for e in errs.values()) and len(set(errs.values())) == len(errs)
    t = step_times(toy, repeats=3)
    assert set(t["median_s"]) == {"std", "cd", "std_nobank"} and t["teacher_evals"]["std_nobank"] > 10


def test_report_ends_with_name_value_lines(capsys, monkeypatch):
    monkeypatch.setattr(toy_mod, "ETAS", (0.75,))
    monkeypatch.setattr(toy_mod, "NFES", (4,))
    main(["--steps", "5", "--pretrain-steps", "20", "--batch", "64"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"std_toy_nfe4_error_vs_base: \d+\.\d+", lines[-1])
    assert any(line.startswith("bank_step_time_ratio: ") for line in lines)
    assert any(line.startswith("std below cd+start in ") for line in lines)
