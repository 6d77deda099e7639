"""The STD toy with tiny budgets: the exact teacher's ODE is consistent, each method trains with the project's
trajectory code, distillation improves on the base model, and the report ends in ``name: value`` lines."""

import re

import torch

from training.std.toy import Toy, main, step_times


def test_exact_teacher_ode_is_self_consistent():
    toy = Toy(batch=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g) * (1 - toy.acp[779]).sqrt()
    fine = toy.exact_endpoint(x, 779)
    coarse = toy.ddim(x, 779, 0, toy.teacher_eps, substeps=2000)
    coarse = (coarse - (1 - toy.acp[0]).sqrt() * toy.teacher_eps(coarse, torch.zeros(500, dtype=torch.long))) \
        / toy.acp[0].sqrt()
    assert (fine - coarse).norm(dim=1).mean() < 0.02
    # endpoints land near the ring of radius 2 the teacher's data lies on
    assert ((fine.norm(dim=1) - 2).abs() < 0.6).float().mean() > 0.9


def test_methods_run_with_the_bank_and_beat_nothing(tmp_path):
    toy = Toy(batch=128)
    base = toy.pretrained(150)
    for method in ("std", "cd"):
        student = toy.distill(base, method, 0.75, 30)
        assert toy.endpoint_error(student, 0.75, 4, n=200) < 10
    t = step_times(toy, base, repeats=3)
    assert set(t["median_s"]) == {"std", "cd", "std_nobank"} and t["teacher_evals"]["std_nobank"] > 10


def test_report_ends_with_name_value_lines(capsys, monkeypatch):
    import training.std.toy as toy_mod

    monkeypatch.setattr(toy_mod, "ETAS", (0.75,))
    monkeypatch.setattr(toy_mod, "NFES", (4,))
    main(["--steps", "5", "--pretrain-steps", "5", "--batch", "64"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"bank_step_time_ratio: \d+\.\d+", lines[-1])
    assert any(line.startswith("std_vs_cd_error_ratio_nfe4_eta0.75: ") for line in lines)
