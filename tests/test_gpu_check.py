"""bench/gpu_check.py, the one script a GPU machine runs, works: its --smoke mode runs every section's code on the
tiny SDXL-shaped zoo on the CPU and prints one ``name: value`` line per figure."""

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=900, cwd=REPO)


def test_the_smoke_run_prints_every_figure():
    proc = run("--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    for name in ("vae_fp32_1x1024x1024_seconds", "vae_bf16_4x1024x576_seconds", "image_nfe4_fused_seconds",
                 "image_nfe8_unfused_seconds", "image_nfe4_bare_unet_vae_seconds",
                 "image_nfe4_diffusers_img2img_seconds", "stream_frames", "stream_peak_gib",
                 "trainer_sdxl_12gb_peak_gib", "trainer_sid_sd15_12gb_peak_gib", "gpu_check_seconds"):
        assert name in figures, f"{name} missing from:\n{proc.stdout}"
    assert figures["stream_frames"] == "8" and figures["device"] == "cpu (smoke)"
    # every phase of each trainer has its time (a phase left untimed would be missing from the GPU run's figures)
    std = ("data", "vae", "text", "teacher", "target", "student", "backward", "bank", "optimizer")
    for label, phases in (("sdxl_12gb", std), ("sdxl_24gb", std + ("discriminator",)),
                          ("sid_sd15_12gb", ("text", "generator", "fake_score", "teacher", "backward", "optimizer"))):
        for phase in phases:
            assert float(figures[f"trainer_{label}_{phase}_seconds"]) >= 0
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check_seconds: ")


def test_without_a_gpu_the_full_run_says_so():
    if torch.cuda.is_available():
        return  # a GPU machine runs the real check instead
    proc = run()
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA GPU here")
    assert run("--smoke", "--only", "disk").returncode == 2
