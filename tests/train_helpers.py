"""Helpers shared by the trainer tests: tiny datasets, interrupting a run at a step, reading exports."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def image_folder(folder: Path, n: int = 5, seed: int = 0, sizes=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = sizes[i] if sizes else (72 + 8 * i, 80)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@contextmanager
def stop_at(method_cls, step: int):
    """Inside the block a run asks to stop (as Ctrl-C does) after optimiser step ``step``."""
    original = method_cls.after_optimizer_step

    def patched(self):
        original(self)
        if self.trainer.step + 1 == step:
            self.trainer.request_stop()
    method_cls.after_optimizer_step = patched
    try:
        yield
    finally:
        method_cls.after_optimizer_step = original


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_a_training_run(cmd, out, signum, group: bool = False):
    """Start ``cmd`` (a trainer), wait until it has logged step 1, send ``signum`` to it (``group``: to its whole
    process group, data workers included, as systemd, Slurm or a terminal do); (exit code, stderr)."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    deadline = time.time() + 300
    log = out / "train.log"
    while time.time() < deadline and proc.poll() is None and not (log.exists() and "step 1/" in log.read_text()):
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a hang: never leave the run behind
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait()
    return proc.returncode, err
