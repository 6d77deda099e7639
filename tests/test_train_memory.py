"""bench/train_memory.py: the per-preset memory accounting uses the real model sizes and each preset's true dtypes,
so changing a preset's precision, rank or optimiser changes the figures (and the script's last line is parseable)."""

import importlib.util
import re
import sys

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("train_memory", REPO / "bench" / "train_memory.py")
train_memory = importlib.util.module_from_spec(spec)
sys.modules["train_memory"] = train_memory
spec.loader.exec_module(train_memory)


def test_real_sizes_and_true_dtypes_per_preset(monkeypatch):
    xl = train_memory.account("sdxl-24gb")
    assert 190e6 < xl["trainable_params"] < 200e6  # rank 64 on the paper's targets: the official LoRA's ~197 M
    assert xl["frozen_dtype"] == "bfloat16" and 2.55e9 * 2 < xl["unet"] < 2.58e9 * 2  # the SDXL UNet in bf16
    assert xl["optimizer"] == 2 * xl["trainable"] and xl["gradients"] == xl["trainable"]  # AdamW: two fp32 moments
    assert xl["text_encoders"] == 0 and xl["text_encoders_cpu"] > 1.3e9  # offloaded after caching
    assert xl["adversary"] > 0
    small = train_memory.account("sdxl-12gb")
    assert 0.5 * small["trainable"] < small["optimizer"] < 0.52 * small["trainable"]  # two 8-bit moments
    assert small["vae"] == xl["vae"] // 2  # the 12 GB preset keeps its VAE in bf16
    assert small["static"] < 0.6 * small["budget"]
    sid = train_memory.account("sd15-12gb")
    assert sid["ema"] > 0 and sid["text_encoders"] > 0
    from training.std import method

    monkeypatch.setitem(method.PRESETS["sdxl-12gb"], "mixed_precision", "no")
    fp32 = train_memory.account("sdxl-12gb")
    assert fp32["frozen_dtype"] == "float32" and fp32["unet"] == 2 * small["unet"]


def test_measure_needs_cuda_and_the_report_ends_with_its_figure(capsys):
    assert train_memory.measure("sd15-8gb", 1) is None or train_memory.torch.cuda.is_available()
    train_memory.main(["--presets", "sd15-8gb,sdxl-12gb"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"train_memory_sdxl12gb_static_fraction: 0\.\d+", lines[-1])
    assert any(line.startswith("sdxl-12gb ") for line in lines)
