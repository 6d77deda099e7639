"""Shared fixtures and suite-wide rules.

* Real-host fixtures skip (with the reason shown by -ra) unless COMFYUI_PATH is set.
* ``STD_NO_SKIP=1`` (what ``.ci/run`` sets) turns every skip into a failure, so CI cannot pass with host or browser
  tests silently skipped.
* Tests marked ``bad_input`` are counted; the summary line ``bad-input cases: N passed`` is what docs/measured.md quotes.
* The real-host tests must not write into the ComfyUI tree: its file list, sizes and mtimes are recorded when the
  host boots and compared when the session ends (a difference fails the run).
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from tools import comfy_host  # noqa: E402

NO_SKIP = os.environ.get("STD_NO_SKIP", "") not in ("", "0")
_TREE = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Under STD_NO_SKIP a skip (in setup or in the test) is reported as a failure with the skip's reason."""
    if not NO_SKIP or call.excinfo is None or not call.excinfo.errisinstance(pytest.skip.Exception):
        return None
    from _pytest.reports import TestReport

    report = TestReport.from_item_and_call(item, call)
    report.outcome = "failed"
    report.longrepr = f"skipped under STD_NO_SKIP=1 (CI runs every test): {call.excinfo.value}"
    return report


def pytest_terminal_summary(terminalreporter):
    passed = [r for r in terminalreporter.stats.get("passed", []) if "bad_input" in r.keywords]
    failed = [r for r in terminalreporter.stats.get("failed", []) if "bad_input" in r.keywords]
    host_counts = {key: sum(1 for r in terminalreporter.stats.get(key, []) if "host" in r.keywords
                            and (r.when == "call" or key != "passed"))
                   for key in ("passed", "failed", "skipped")}
    terminalreporter.write_line(f"bad-input cases: {len(passed)} passed, {len(failed)} failed")
    where = f" (ComfyUI {'.'.join(map(str, comfy_host.comfyui_version()))})" if comfy_host.comfyui_path() else ""
    terminalreporter.write_line(f"real-host tests{where}: " + ", ".join(f"{v} {k}" for k, v in host_counts.items()))
    if _TREE:
        changed = comfy_host.tree_changes(_TREE)
        if changed:
            terminalreporter.write_line(f"the tests wrote into the ComfyUI tree: {changed[:10]}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _TREE and comfy_host.tree_changes(_TREE):
        session.exitstatus = 1


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    if not comfy_host.comfyui_path():
        pytest.skip(comfy_host.REAL_HOST_REASON)
    _TREE.update(comfy_host.tree_snapshot())
    host = comfy_host.boot(tmp_path_factory.mktemp("comfy"))
    assert host.loaded, "the pack failed to load in ComfyUI (see log)"
    return host


def pytest_collection_modifyitems(items):
    """Tag every test that uses the real host (directly or through another fixture) with the marker ``host``."""
    for item in items:
        if "host" in getattr(item, "fixturenames", ()):
            item.add_marker("host")

@pytest.fixture(scope="session")
def tiny_ckpt(host):
    path = host.base / "models" / "checkpoints" / "tiny_sd15.safetensors"
    if not path.exists():
        comfy_host.build_tiny_sd15(path)
    return path.name


@pytest.fixture(scope="session")
def tiny_models(host, tiny_ckpt):
    """(model, clip, vae) of the tiny checkpoint, loaded once."""
    import torch

    with torch.inference_mode():
        return host.M["CheckpointLoaderSimple"]().load_checkpoint(tiny_ckpt)[:3]


@pytest.fixture(scope="session")
def style_files(host, tiny_models):
    """Tiny IP-Adapters (one for this model, one SDXL-shaped), tiny CLIP vision encoders (projection 32 and 48), a
    corrupt adapter file and a style image in input/; returns names and the loaded encoders."""
    import numpy as np
    import torch
    from PIL import Image

    models = host.base / "models"
    comfy_host.write_tiny_ip_adapter(tiny_models[0], models / "ipadapter" / "tiny_ip_adapter.safetensors")
    comfy_host.write_tiny_ip_adapter(tiny_models[0], models / "ipadapter" / "tiny_sdxl_shaped.safetensors",
                                     cross_dim=2048, num_layers=70)
    comfy_host.write_tiny_clip_vision(host.base, models / "clip_vision" / "tiny_clip_vision.safetensors")
    comfy_host.write_tiny_clip_vision(host.base, models / "clip_vision" / "tiny_clip_vision_48.safetensors",
                                      projection_dim=48)
    (models / "ipadapter" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(host.base / "input" / "std_style.png")
    with torch.inference_mode():
        clip_vision = host.M["CLIPVisionLoader"]().load_clip("tiny_clip_vision.safetensors")[0]
        clip_vision_48 = host.M["CLIPVisionLoader"]().load_clip("tiny_clip_vision_48.safetensors")[0]
    return {"ipadapter": "tiny_ip_adapter.safetensors", "clip_name": "tiny_clip_vision.safetensors",
            "clip_vision": clip_vision, "clip_vision_48": clip_vision_48}


@pytest.fixture(scope="session")
def host_files(host, tiny_models, style_files):
    """Content image, clip (24 frames at 12 fps with a 2 s tone growing louder), inpainting image (alpha = mask) and
    a folder of photos in input/, a PEFT-format STD LoRA with metadata in
    models/loras/, a tiny ControlNet in models/controlnet/ (plus the style files)."""
    import numpy as np
    import torch
    from PIL import Image

    from comfyui_std.core.video import save_video

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(host.base / "input" / "std_content.png")
    clip = torch.rand(1, 64, 64, 3).repeat(24, 1, 1, 1) * torch.linspace(0.5, 1, 24).view(24, 1, 1, 1)
    # a 2 s tone, one channel, growing louder (so where a trimmed track starts can be told from its level)
    tone = torch.sin(torch.arange(32000) * (2 * torch.pi * 330 / 16000))[None] * torch.linspace(0.05, 0.9, 32000)
    save_video(clip, host.base / "input" / "std_content.mp4", fps=12, audio=(tone, 16000))
    rgba = np.concatenate([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), np.full((64, 64, 1), 255, np.uint8)], 2)
    rgba[:, :32, 3] = 0  # LoadImage's mask is 1 - alpha: the transparent left half is repainted
    Image.fromarray(rgba, "RGBA").save(host.base / "input" / "std_inpaint.png")
    photos = host.base / "input" / "std_photos"
    photos.mkdir(exist_ok=True)
    for i, size in enumerate([(64, 64), (64, 64), (96, 80)]):  # the third is fitted to the first ("crop to first")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(photos / f"photo{i + 1}.png")
    lora = host.base / "models" / "loras" / "tiny_std_eta0.75.safetensors"
    n = comfy_host.write_peft_lora(tiny_models[0], lora, metadata={"std.start_strength": "0.75", "std.nfe": "4"})
    controlnet = comfy_host.build_tiny_controlnet(host.base / "models" / "controlnet" / "tiny_controlnet.safetensors")
    return {"lora": lora.name, "layers": n, "controlnet": controlnet.name, **style_files}
