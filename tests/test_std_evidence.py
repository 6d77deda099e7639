"""The STD-vs-CD evidence bench: ``--smoke`` runs the whole pipeline (teachers, the three students with the trainer's
trajectory math and bank, metrics, r_n, verdict) with tiny budgets, and the registered verdict rule is a pure
function that can return each of its three answers."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "std_evidence.py"


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("std_evidence", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["std_evidence"] = module
    spec.loader.exec_module(module)
    return module


def cells(ev, r_test, r_control, test_std, test_cd, test_cdstd, control_std, control_cdstd):
    """Cells at NFE 2 and 4 for one η; L2 lists are per seed."""
    out = []
    for nfe in (2, 4):
        out.append(ev.Cell("test", 0.8, nfe, r_test, {"std": test_std, "cd": test_cd, "cd@std": test_cdstd}))
        out.append(ev.Cell("control", 0.8, nfe, r_control,
                           {"std": control_std, "cd": control_cdstd, "cd@std": control_cdstd}))
    return out


def test_verdict_supported(ev):
    c = cells(ev, 1.6, 1.0, [1.0, 1.1, 0.9], [1.5, 1.6, 1.4], [1.4, 1.5, 1.35], [1.0, 1.1, 0.9], [1.02, 1.08, 0.91])
    assert ev.verdict(c)[0] == "supported"


def test_verdict_refuted_when_std_ties_cd_at_its_indices(ev):
    c = cells(ev, 1.6, 1.0, [1.0, 1.1, 0.9], [1.5, 1.6, 1.4], [1.01, 1.08, 0.92], [1.0, 1.1, 0.9], [1.0, 1.1, 0.9])
    word, why = ev.verdict(c)
    assert word == "refuted" and "indices" in why


def test_verdict_inconclusive(ev):
    win = ([1.0, 1.1, 0.9], [1.5, 1.6, 1.4], [1.4, 1.5, 1.35])
    assert ev.verdict(cells(ev, 1.1, 1.0, *win, [1.0, 1.1, 0.9], [1.0, 1.1, 0.9]))[0] == "inconclusive"  # no r >= 1.3
    # STD wins where r >= 1.3 but wins in the control too: the gain is not the mismatch's
    word, why = ev.verdict(cells(ev, 1.6, 1.0, *win, [1.0, 1.1, 0.9], [1.5, 1.6, 1.4]))
    assert word == "inconclusive" and "controls" in why
    # a control with the mismatch is no control
    assert ev.verdict(cells(ev, 1.6, 1.5, *win, [1.0, 1.1, 0.9], [1.0, 1.1, 0.9]))[0] == "inconclusive"
    # STD beats CD at its indices but not plain CD
    assert ev.verdict(cells(ev, 1.6, 1.0, win[0], [1.0, 1.1, 0.9], win[2], [1.0, 1.1, 0.9],
                            [1.0, 1.1, 0.9]))[0] == "inconclusive"


def test_beats_is_paired_and_needs_two_standard_errors(ev):
    assert ev.beats([1.0, 2.0, 3.0], [1.1, 2.1, 3.1])          # a constant gain: zero spread
    assert not ev.beats([1.0, 2.0, 3.0], [1.3, 1.9, 3.1])      # mean gain 0.1, SE 0.12
    assert ev.ties([1.0, 2.0, 3.0], [1.3, 1.9, 3.1]) and not ev.ties([1.0, 2.0], [1.1, 2.1])


def test_the_style_transform_and_the_lora_student(ev):
    import torch

    x = ev.load_data()["teacher_x"][:5]
    s = ev.stylise(x)
    assert s.shape == x.shape and (s <= -x + 1e-6).all()  # dilated strokes, inverted
    teacher = ev.EpsNet(32)
    student, params = ev.with_lora(teacher, 4, 0)
    t, y = torch.full((5,), 500), torch.arange(5)
    assert torch.equal(student(x, t, y), teacher(x, t, y))  # up = 0: the student starts as the teacher
    assert params and all(n.endswith((".down", ".up")) for n, _ in params)
    assert not any(p.requires_grad for n, p in student.named_parameters() if not n.endswith((".down", ".up")))


def test_std_states_come_from_the_bank_and_cd_at_std_replays_their_indices(ev, tmp_path):
    import dataclasses

    import torch

    data = ev.load_data()
    setting = ev.SETTINGS["test"]
    x, y = ev.content(data, setting, "train")
    grid, n0 = ev.DDIMGrid(), ev.start_index(0.6)
    teacher = ev.EpsNet(32).requires_grad_(False)
    budget = dataclasses.replace(ev.SMOKE, steps=40, batch=4, width=32)
    record = []
    ev.distill(teacher, ev.BankStates(str(tmp_path), grid, x, y, n0, setting, 4, 0), 0.6, budget, 0, record)
    indices = torch.cat(record)
    assert (indices == n0).any() and (indices < n0 - 5).any() and (indices >= 2).all()
    replay = ev.ForwardStates(grid, x, y, n0, setting, 4, record)
    assert torch.equal(replay.draw(7, torch.Generator())["n"], record[7])
    plain = ev.ForwardStates(grid, x, y, n0, setting, 64).draw(0, torch.Generator().manual_seed(0))["n"]
    assert plain.min() >= 1 and plain.max() < n0


def test_smoke_run_prints_the_registered_rule_first_and_ends_with_the_ratio():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "registered before any result:"
    text = proc.stdout
    assert text.index("registered before any result") < text.index("L2 to the teacher's many-step output")
    for title in ("(ema weights", "(raw weights", "MMD²", "style score", "content kept", "mismatch r_n"):
        assert title in text
    assert re.search(r"^verdict: (SUPPORTED|REFUTED|INCONCLUSIVE): ", text, re.MULTILINE)
    assert len(re.findall(r"^  (test|control) η 0\.[68]: r = \d+\.\d\d; r_n( \d+\.\d\d)+$", text, re.MULTILINE)) == 4
    assert re.fullmatch(r"std_over_cd_at_std_indices_nfe4: \d+\.\d{3} ± \d+\.\d{3}", lines[-1])
