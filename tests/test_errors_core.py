"""The core's one message format and its path redaction (what a ComfyUI or app client may be told)."""

import pytest

from comfyui_std.core.errors import STDInputError, check_range, redact_paths


@pytest.mark.parametrize("message, expected", [
    ("could not decode 'a.mp4': Invalid data found when processing input: '/srv/comfy/input/a.mp4'",
     "could not decode 'a.mp4': Invalid data found when processing input: 'a.mp4'"),
    ("cannot write into /home/ann/runs/out: Permission denied", "cannot write into out: Permission denied"),
    ("C:\\Users\\ann\\clip.mp4 is broken", "clip.mp4 is broken"),
    ("\\\\nas\\share\\frames\\001.png is broken", "001.png is broken"),
    ("see https://pytorch.org/get-started/locally/ for builds", "see https://pytorch.org/get-started/locally/ for builds"),
    ("ratios 1/2 and 3/4/5, a relative dir/file.png, the folder /tmp/", None),
])
def test_absolute_paths_are_cut_to_their_last_part(message, expected):
    assert redact_paths(message) == (message if expected is None else expected)


def test_messages_name_the_input_and_the_range():
    with pytest.raises(STDInputError, match=r"^nfe: got 0, allowed range is \[1, 50\]$"):
        check_range("nfe", 0, 1, 50, kind=int)
