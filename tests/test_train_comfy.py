"""Real host (COMFYUI_PATH): the STD trainer reads the tiny single-file checkpoint as ComfyUI users have it, and the
LoRA it exports applies in ComfyUI 0.3.64 with every key matched (core LoraLoader and STD LoRA Loader)."""

import logging
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from training.common.models import write_tiny_tokenizer
from training.std.__main__ import main as cli


@pytest.fixture(scope="module")
def trained_from_single_file(host, tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    out = tmp_path_factory.mktemp("out")
    tok = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    ckpt = host.base / "models" / "checkpoints" / tiny_ckpt
    rc = cli(["--preset", "tiny", "--base", str(ckpt), "--tokenizer", str(tok), "--data", str(d), "--output",
              str(out), "--max-steps", "2", "--checkpoint-every", "0", "--num-previews", "0", "--name", "tiny_std"])
    assert rc == 0
    return out


def test_single_file_student_lora_applies_in_comfyui_with_every_key(host, tiny_models, trained_from_single_file,
                                                                     caplog):
    src = trained_from_single_file / "tiny_std.safetensors"
    with safe_open(str(src), "pt") as f:
        keys = list(f.keys())
    modules = {k.split(".")[0] for k in keys}
    shutil.copy(src, host.base / "models" / "loras" / "tiny_std_trained.safetensors")
    model, clip, _ = tiny_models
    with caplog.at_level(logging.WARNING):
        patched, _ = host.M["LoraLoader"]().load_lora(model, clip, "tiny_std_trained.safetensors", 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(modules) > 50  # every module of the file became a weight patch
    out = host.M["STDLoraLoader"].execute(model, "tiny_std_trained.safetensors", 1.0)
    assert out.result[1] == 0.75
    assert f"{len(modules)}/{len(modules)} layers applied" in out.ui["text"][0]
