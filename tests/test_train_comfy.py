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


def test_sid_lsg_generator_from_the_single_file_runs_as_a_one_step_workflow(host, tiny_ckpt, tiny_models,
                                                                             tmp_path, caplog):
    import json

    import comfy_host
    from training.sid_lsg.__main__ import main as sid_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na lighthouse\n")
    tok = write_tiny_tokenizer(tmp_path / "tok")
    ckpt = host.base / "models" / "checkpoints" / tiny_ckpt
    assert sid_cli(["--preset", "tiny", "--base", str(ckpt), "--tokenizer", str(tok), "--prompts", str(prompts),
                    "--output", str(tmp_path / "out"), "--max-steps", "1", "--checkpoint-every", "0",
                    "--num-previews", "0", "--name", "tiny_sid"]) == 0
    shutil.copy(tmp_path / "out" / "tiny_sid.safetensors", host.base / "models" / "loras" / "tiny_sid.safetensors")
    with safe_open(str(tmp_path / "out" / "tiny_sid.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    with caplog.at_level(logging.WARNING):
        out = host.M["STDLoraLoader"].execute(tiny_models[0], "tiny_sid.safetensors", 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert out.result[2] == 625 and f"{len(modules)}/{len(modules)} layers applied" in out.ui["text"][0]
    prompt = json.loads((comfy_host.REPO / "example_workflows" / "api" / "sid_onestep.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = tiny_ckpt
    prompt["2"]["inputs"]["lora_name"] = "tiny_sid.safetensors"
    prompt["4"]["inputs"].update(width=64, height=64)
    ex, server = comfy_host.execute(prompt)
    assert ex.success, [d for e, d in server.events if e == "execution_error"]
    images = ex.history_result["outputs"]["6"]["images"]
    assert Image.open(host.base / "output" / images[0]["subfolder"] / images[0]["filename"]).size == (64, 64)
