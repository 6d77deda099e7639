"""``gradio_app.py`` on the command line: every bad argument or unusable path is ``error: ...`` and exit code 2.

The cases run ``gradio_app.main`` in this process (argparse's exit is caught), which is fast; one case runs the real
script in a subprocess to check the exit code and that no traceback reaches the terminal.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradio_app
from app_server import REPO


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        code = gradio_app.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores permission bits, so it gets one of sysfs' folders)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # running as root
        folder = Path("/sys/kernel")
        if not folder.is_dir():
            pytest.fail("running as root without /sys/kernel: no unwritable folder to test with")
    return folder


def case_args(case: str, tmp_path: Path) -> list[str]:
    """The arguments of one case (files it needs are made in ``tmp_path``)."""
    models = ["--models-dir", str(tmp_path), "--base", "missing.safetensors"]  # never reached: args fail first
    a_file = tmp_path / "results.png"
    a_file.write_bytes(b"not a folder")
    (tmp_path / "empty.txt").write_text("# nobody\n\n", encoding="utf-8")
    (tmp_path / "bad-line.txt").write_text("alice:secret\nbob\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x01user:pass")
    return {
        "port-above-65535": ["--port", "99999"],
        "port-negative": ["--port", "-1"],
        "port-not-a-number": ["--port", "http"],
        "output-dir-is-a-file": ["--output-dir", str(a_file)],
        "output-dir-inside-a-file": ["--output-dir", str(a_file / "sub")],
        "output-dir-unwritable": ["--output-dir", str(unwritable_folder(tmp_path) / "std-out")],
        "auth-without-colon": ["--auth", "alice"],
        "auth-empty-password": ["--auth", "alice:"],
        "auth-empty-user": ["--auth", ":secret"],
        "auth-file-missing": ["--auth-file", str(tmp_path / "no-such-file.txt")],
        "auth-file-is-a-folder": ["--auth-file", str(tmp_path)],
        "auth-file-empty": ["--auth-file", str(tmp_path / "empty.txt")],
        "auth-file-bad-line": ["--auth-file", str(tmp_path / "bad-line.txt")],
        "auth-file-binary": ["--auth-file", str(tmp_path / "binary.txt")],
        "max-frames-zero": ["--max-frames", "0"],
        "max-frames-negative": ["--max-frames", "-5"],
        "max-frames-not-a-number": ["--max-frames", "many"],
        "device-unknown": ["--device", "tpu9"],
        "device-cuda-missing": ["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"],
        "dtype-unknown": ["--dtype", "fp8"],
        "tiny-unknown-architecture": ["--tiny", "sd3"],
        "unknown-flag": ["--lisen"],
    }[case] + models


CASES = {
    "port-above-65535": "error: argument --port: 99999 is not a port number: use 1-65535",
    "port-negative": "error: argument --port: -1 is not a port number: use 1-65535",
    "port-not-a-number": "error: argument --port: expected a port number (1-65535), got 'http'",
    "output-dir-is-a-file": "error: argument --output-dir: '{tmp}/results.png' is a file, not a folder",
    "output-dir-inside-a-file": "error: argument --output-dir: cannot write to '{tmp}/results.png/sub': Not a directory",
    "output-dir-unwritable": "error: argument --output-dir: cannot write to '",
    "auth-without-colon": "error: argument --auth: expected USER:PASSWORD with a non-empty user and password",
    "auth-empty-password": "error: argument --auth: expected USER:PASSWORD with a non-empty user and password",
    "auth-empty-user": "error: argument --auth: expected USER:PASSWORD with a non-empty user and password",
    "auth-file-missing": "error: argument --auth-file: '{tmp}/no-such-file.txt' does not exist",
    "auth-file-is-a-folder": "error: argument --auth-file: '{tmp}' is a folder, not a file",
    "auth-file-empty": "error: argument --auth-file: '{tmp}/empty.txt' has no user:password line",
    "auth-file-bad-line": "error: argument --auth-file: '{tmp}/bad-line.txt' line 2: expected USER:PASSWORD",
    "auth-file-binary": "error: argument --auth-file: '{tmp}/binary.txt' is not UTF-8 text",
    "max-frames-zero": "error: argument --max-frames: got 0, allowed range is [1, 100000]",
    "max-frames-negative": "error: argument --max-frames: got -5, allowed range is [1, 100000]",
    "max-frames-not-a-number": "error: argument --max-frames: expected a whole number of frames, got 'many'",
    "device-unknown": "error: argument --device: 'tpu9' is not a device",
    "device-cuda-missing": "error: argument --device: 'cuda",
    "dtype-unknown": "error: argument --dtype: invalid choice: 'fp8'",
    "tiny-unknown-architecture": "error: argument --tiny: invalid choice: 'sd3'",
    "unknown-flag": "error: unrecognized arguments: --lisen",
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_argument_is_one_error_line_and_exit_code_2(case, tmp_path, capsys):
    code, err = run_main(case_args(case, tmp_path), capsys)
    assert code == 2, err
    assert CASES[case].format(tmp=tmp_path) in err, err
    assert "Traceback" not in err
    if case.startswith("auth"):
        assert "secret" not in err  # a password is never echoed


@pytest.mark.bad_input
def test_the_script_itself_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "gradio_app.py", "--port", "99999"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: argument --port: 99999 is not a port number" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.bad_input
def test_a_port_in_use_is_a_message(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(["--tiny", "--port", str(port), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and f"error: cannot serve on port {port}:" in err and "Pick another with --port" in err
    assert "Traceback" not in err


@pytest.mark.bad_input
def test_listen_without_a_login_warns_before_anything_else(tmp_path, capsys):
    code, err = run_main(["--listen", "--models-dir", str(tmp_path), "--base", "missing.safetensors"], capsys)
    assert code == 2
    warning, error = err.index("warning: serving on every network interface (--listen) with no login"), \
        err.index("error: base model: 'missing.safetensors' was not found")
    assert warning < error
