"""The warping-error metric separates a consistent moving clip from a flickering one."""

import numpy as np
import pytest

from tools.warping_error import main, warping_error


def moving_clip(n=6, flicker=0.0, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.random((64 + 2 * n, 96 + 2 * n, 3)).astype(np.float32)
    import cv2

    base = cv2.GaussianBlur(base, (7, 7), 2)
    frames = [base[t:t + 64, 2 * t:2 * t + 96] for t in range(n)]  # smooth diagonal pan
    return np.stack([np.clip(f + flicker * rng.standard_normal(f.shape), 0, 1) for f in frames]).astype(np.float32)


def test_consistent_clip_scores_lower_than_flickering_one():
    steady = warping_error(moving_clip())
    flicker = warping_error(moving_clip(flicker=0.15), reference=moving_clip())
    assert steady < 0.02 < flicker


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 frames"):
        warping_error(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="does not match"):
        warping_error(np.zeros((3, 8, 8, 3)), reference=np.zeros((3, 9, 8, 3)))


def test_cli_prints_figure_last(tmp_path, capsys):
    import torch

    from comfyui_std.core.video import save_video

    path = save_video(torch.from_numpy(moving_clip()), tmp_path / "c.mp4", fps=8)
    main([str(path)])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("warping_error: ")


def test_cli_bad_input_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing.mp4")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "video: '" in err and "does not exist" in err
