"""The core's one message format and its path redaction (what a ComfyUI or app client may be told)."""

import re

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



@pytest.mark.bad_input
@pytest.mark.parametrize("prefix, message", [
    ("STD/a\x00b", "control characters (U+0000)"), ("a\nb", "control characters (U+000A)"),
    ("a\u202eb", "control characters (U+202E)"), ("x" * 201, "at most 200"), ("STD/" + "y" * 121, "at most 120 a part"),
    ("../x", "inside the output folder"), ("/etc/x", "inside the output folder"), ("", "inside the output folder"),
    ("C:/x", "inside the output folder"), ("STD/../../x", "inside the output folder"), (3, "expected text")])
def test_file_name_prefixes_are_checked_in_one_place(prefix, message):
    from comfyui_std.core.filenames import check_prefix

    with pytest.raises(STDInputError, match=re.escape(message)):
        check_prefix(prefix)


def test_good_prefixes_pass_normalised():
    from comfyui_std.core.filenames import check_prefix

    assert check_prefix(" STD/video ") == "STD/video" and check_prefix("a\\b/./c") == "a/b/c"
    assert check_prefix("Stil/видео_1") == "Stil/видео_1"
