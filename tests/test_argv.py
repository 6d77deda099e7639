"""Signed special numbers on every command line reach the option's own check (comfyui_std.core.argv).

Bug caught: argparse read ``--gamma -inf`` as an option followed by another option ("expected one argument"), so the
user never learnt the allowed range, and ``-1e-3`` went the same way."""

import argparse

import pytest

from comfyui_std.core.argv import attach_values


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--gamma", type=float)
    p.add_argument("--lr-warmup", type=int)
    p.add_argument("--flag", action="store_true")
    p.add_argument("inputs", nargs="*")
    return p


@pytest.mark.parametrize("argv, expected", [
    (["--gamma", "-inf"], ["--gamma=-inf"]),
    (["--gamma", "-NaN", "x"], ["--gamma=-NaN", "x"]),
    (["--gamma", "-1e-3"], ["--gamma=-1e-3"]),
    (["--lr-w", "-inf"], ["--lr-w=-inf"]),  # an abbreviation argparse accepts
    (["--gamma", "-1.5"], ["--gamma", "-1.5"]),  # argparse reads plain negatives itself
    (["--flag", "-inf"], ["--flag", "-inf"]),  # takes no value: left for argparse to refuse
    (["--gamma=-inf"], ["--gamma=-inf"]),
    (["x", "-inf"], ["x", "-inf"]),
    (["--gamma", "-1.e-3"], ["--gamma=-1.e-3"]),
    (["--", "--gamma", "-inf"], ["--", "--gamma", "-inf"]),  # after "--" everything is a positional
])
def test_attach_values(argv, expected):
    assert attach_values(_parser(), argv) == expected


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["-inf", "-nan", "-Infinity"])
def test_batch_cli_names_the_range_for_a_signed_special(value, tmp_path, capsys):
    from std_app.batch import main

    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["--tiny", "--gamma", value, str(image), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: gamma: got" in err and "allowed range is [0.0, 1.0]" in err and "expected one argument" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.bad_input
def test_trainer_names_the_rule_for_a_signed_special(tmp_path, capsys):
    from training.std.__main__ import main

    assert main(["--preset", "tiny", "--data", str(tmp_path), "--learning-rate", "-inf", "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --learning-rate: expected a finite number, got '-inf'" in err


@pytest.mark.bad_input
def test_app_names_the_rule_for_a_signed_special(capsys):
    import gradio_app

    with pytest.raises(SystemExit) as stop:
        gradio_app.main(["--tiny", "--max-frames", "-inf"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--max-frames: expected a whole number of frames, got '-inf'" in err
