"""Stopping cleanly: SIGINT and SIGTERM end the app and the batch CLI through their normal exit path, so the --tiny
model folder is removed, a video being written leaves no ``.partial`` file, and the exit code says which signal
(130 / 143), without a traceback. Each run gets its own TMPDIR, so what it leaves behind is seen."""

import os
import signal
import subprocess
import sys
import time

import pytest

from app_server import REPO, free_port, start_cli, wait_for_config
from media_files import write_clip


def private_env(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), scratch


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_tiny_app_stopped_by_a_signal_leaves_no_model_folder(tmp_path, signum, code):
    env, scratch = private_env(tmp_path)
    port, log = free_port(), tmp_path / "app.log"
    proc = start_cli(["--tiny", "--output-dir", str(tmp_path / "out")], log, port, env=env)
    try:
        wait_for_config(proc, port, log)
        assert [p.name for p in scratch.iterdir() if p.name.startswith("std-tiny-")], "precondition: the zoo"
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == code, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"stopped ({signal.Signals(signum).name})" in text and "Traceback" not in text, text[-2000:]
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("std-")]
    noise = ("requires torchvision", "Writing model shards", "should be kept in float32", "No LoRA keys")
    assert not [n for n in noise if n in text], text[-3000:]  # a quiet start: the project's own lines only


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_batch_cli_stopped_mid_video_leaves_no_partial_file(tmp_path, signum, code):
    env, scratch = private_env(tmp_path)
    (tmp_path / "in").mkdir()
    clip = write_clip(tmp_path / "in" / "long.mp4", frames=400, fps=24, size=(64, 64))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "std_app.batch", "--tiny", str(clip), "--output", str(out),
                             "--nfe", "2", "--frames-per-batch", "2", "--overwrite"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out.glob(".*.partial")):  # the video is being written
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        assert list(out.glob(".*.partial")), "precondition: the video was being written"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert f"stopped ({signal.Signals(signum).name})" in err and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == []
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("std-")]
