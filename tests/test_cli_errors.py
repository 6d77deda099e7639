"""Bad arguments and unusable paths at the trainer-side command lines that have no test file of their own
(``python -m training.bank``, ``python -m tools.warping_error``): each answers ``error: ...`` with exit code 2,
never a traceback."""

import subprocess
import sys

import pytest
import torch
from train_helpers import REPO, image_folder

from training.bank import main as bank_cli

BANK = [
    ([], "the first argument must be 'build'"),
    (["make"], "the first argument must be 'build'"),
    (["build", "--draws", "0"], "draws: got 0"),
    (["build", "--draws", "many"], "--draws: expected an integer"),
    (["build", "--bank-dir", "{file}"], "bank_dir: "),
    (["build", "--bank-dir", "{file}/sub"], "cannot write into"),
    (["build", "--output", "{file}"], "output: "),
    (["build", "--data", "{missing}"], "is not a folder"),
    (["build", "--start-strength", "2"], "start_strength: got 2.0"),
    (["build", "--max-steps", "-1"], "max_steps: got -1"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", BANK, ids=[" ".join(a) or "nothing" for a, _ in BANK])
def test_bank_cli_bad_input(tmp_path, capsys, args, message):
    data = image_folder(tmp_path / "data", 1)
    (tmp_path / "file").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "file")).replace("{missing}", str(tmp_path / "nope")) for a in args]
    if args and args[0] == "build":
        args = ["build", "--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "out"), *args[1:]]
    assert bank_cli(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err


def _clip(path, frames=4, size=(32, 32)):
    from comfyui_std.core.video import save_video

    save_video(torch.rand(frames, *size, 3, generator=torch.Generator().manual_seed(0)), path, 8)
    return path


WARP = [
    (["{missing}"], "does not exist"),
    (["{text}"], "is not a supported video"),
    (["{clip}", "--reference", "{short}"], "does not match"),
    (["{clip}", "--frame-load-cap", "-2"], "frame_load_cap"),
    (["{one}"], "need at least 2 frames"),
    (["{clip}", "--frame-load-cap", "x"], "invalid int value"),
    (["{folder}"], "video"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", WARP, ids=[" ".join(a) for a, _ in WARP])
def test_warping_error_cli_bad_input(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "a.txt").write_text("no frames here")
    subst = {"{missing}": tmp_path / "nope.mp4", "{text}": tmp_path / "notes.txt", "{folder}": tmp_path / "frames"}
    if any(a in ("{clip}", "{short}", "{one}") for a in args):
        subst.update({"{clip}": _clip(tmp_path / "c.mp4"), "{short}": _clip(tmp_path / "s.mp4", 4, (16, 16)),
                      "{one}": _clip(tmp_path / "one.mp4", 1)})
    args = [str(subst.get(a, a)) for a in args]
    res = subprocess.run([sys.executable, "-m", "tools.warping_error", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "error: " in res.stderr and message in res.stderr and "Traceback" not in res.stderr
