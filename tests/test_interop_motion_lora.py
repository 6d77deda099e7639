"""STD Motion LoRA (AnimateDiff-Evolved): a v2v LoRA's motion part on AnimateDiff-Evolved's motion models, against
AnimateDiff-Evolved's real code, and the same LoRA on the diffusers path the LoRAs were trained with.

``tools/motion_lora_host.py`` boots ComfyUI with this pack and the peer packs in a process of its own, runs the
example workflow ``interop_animatediff_motion_lora`` on an SDXL-layout checkpoint with random SDXL motion modules in
the Hotshot-XL and the AnimateDiff-SDXL file layouts (loaded by AnimateDiff-Evolved's own loader), and compares one
UNet call of ComfyUI + AnimateDiff-Evolved with ``std_hf.motion`` on an SD1.5-layout checkpoint both read; these tests
assert on what it measured. They skip (fail under STD_NO_SKIP=1) unless COMFYUI_PATH is set and the peer packs are
found ($STD_PEERS_PATH, else ``shared/peers`` beside the repository).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_std.core.motion_format import NORM_ACROSS_FRAMES
from tools import comfy_host, motion_lora_host

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.host

LAYOUTS = {"hotshotxl": ("Hotshot-XL for SDXL", ":HotshotXL:SDXL"),
           "animatediff": ("AnimateDiff v1 for SDXL", ":AnimateDiff:SDXL")}
#: the chain the example workflow is about, upstream first (each node feeds the next)
CHAIN = ["ADE_LoadAnimateDiffModel", "STDMotionLoraLoader", "ADE_ApplyAnimateDiffModelSimple",
         "ADE_UseEvolvedSampling", "STDStylizeVideo"]
TOLERANCE = 1e-3  # relative L2 between the two implementations' UNet outputs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not comfy_host.comfyui_path():
        pytest.skip(comfy_host.REAL_HOST_REASON)
    peers = comfy_host.peers_path()
    missing = comfy_host.missing_peers(peers)
    if missing:
        pytest.skip(f"interop test: the peer packs {', '.join(missing)} are not in {peers} (set "
                    f"{comfy_host.PEERS_ENV} to a folder holding {', '.join(comfy_host.PEER_PACKS)})")
    work = tmp_path_factory.mktemp("motion_lora")
    log = work / "motion_lora_host.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(Path(motion_lora_host.__file__)), "--base", str(work / "base"),
                               "--results", str(work / "results.json"), "--peers", str(peers)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=1500, cwd=REPO,
                              env={**os.environ, "PYTHONPYCACHEPREFIX": str(work / "pycache")})
    assert proc.returncode == 0, f"motion LoRA host exited with {proc.returncode}:\n{log.read_text()[-6000:]}"
    data = json.loads((work / "results.json").read_text())
    assert "files_error" not in data, f"the test files could not be written:\n{data['files_error']}"
    return data


def scenario(results, name):
    r = results["scenarios"].get(name)
    assert r is not None, f"scenario {name} did not run"
    assert r["ok"], f"scenario {name} raised in the motion LoRA host:\n{r['error']}"
    return r


def succeeded(run):
    assert run["valid"], f"ComfyUI refused the prompt: {run['errors']}"
    assert run["success"], f"execution failed: {run['errors']}"
    return run


def test_pack_and_peers_load_and_nothing_is_written_into_their_trees(results):
    assert results["loaded"] == {"comfyui-std": True, **{name: True for name in comfy_host.PEER_PACKS}}
    assert results["tree_changes"] == {"comfyui": [], "peers": []}


def test_example_workflow_chains_the_motion_lora_between_animatediff_evolveds_nodes(results):
    r = scenario(results, "workflow_round_trip")
    assert r["equal"], f"UI file and API twin differ in nodes {r['differences']}"
    prompt = json.loads((REPO / "example_workflows" / "api" / f"{motion_lora_host.WORKFLOW}.json").read_text())
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    for upstream, downstream in zip(CHAIN, CHAIN[1:]):
        assert [ids[upstream], 0] in prompt[ids[downstream]]["inputs"].values(), (upstream, downstream)
    assert prompt[ids["ADE_UseEvolvedSampling"]]["inputs"]["beta_schedule"] == "use existing"
    # one v2v file: its image part through STD LoRA Loader, its motion part through the new node
    lora = prompt[ids["STDLoraLoader"]]["inputs"]
    assert lora["lora_name"] == prompt[ids["STDMotionLoraLoader"]]["inputs"]["lora_name"]
    assert prompt[ids["ADE_UseEvolvedSampling"]]["inputs"]["model"] == [ids["STDLoraLoader"], 0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_workflow_applies_every_motion_tensor_and_changes_the_output(results, layout):
    r = scenario(results, f"sdxl_{layout}")
    files = results["files"]
    for run in r["runs"].values():
        succeeded(run)
        assert [(v["frames"], v["fps"]) for v in run["saved"]] == [(3, 8.0)], run["saved"]
        assert any("start timestep 499" in t for t in run["stylize_text"])
    assert r["mm_info"].endswith(LAYOUTS[layout][1]), r["mm_info"]  # AnimateDiff-Evolved read the intended layout
    n, layers = files["sdxl_lora"]["motion_tensors"], files["sdxl_lora"]["motion_layers"]
    assert (n, layers) == (360, 180)  # 6 down + 9 up modules, 12 linear layers each, down and up factors
    text = r["runs"]["lora"]["node_text"]
    assert text and f"motion LoRA: {n}/{n} tensors applied ({layers} layers)" in text[0], text
    assert LAYOUTS[layout][0] in text[0]
    assert r["shape"] == [3, 4, 8, 8]
    assert r["lora_effect"] > 1e-3 * r["scale"], "the motion LoRA did not change the output"


def test_std_lora_loader_names_the_motion_node_for_the_tensors_it_leaves(results):
    log = scenario(results, "sdxl_hotshotxl")["log"]  # the first run of the workflow (later ones reuse its output)
    assert any("360 motion-module tensors: apply them to the AnimateDiff-Evolved motion model with STD Motion LoRA "
               "(AnimateDiff-Evolved)" in m for m in log), log


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strength_0_gives_the_output_without_the_motion_lora(results, layout):
    r = scenario(results, f"sdxl_{layout}")
    assert r["strength0_vs_plain"] == 0.0
    assert "strength 0: the motion model is unchanged" in r["runs"]["strength0"]["node_text"][0]


def test_kohya_motion_keys_give_the_patches_of_the_peft_keys(results):
    """The same factors as ``lora_unet_<path with _>.lora_down/lora_up`` with per-layer alpha tensors (alpha 8 at
    rank 4, what the PEFT file's std.alpha header says): the same layers patched with the same weight differences,
    on a copy of the motion model (the one it was given keeps no patches)."""
    r = scenario(results, "sdxl_hotshotxl")["kohya"]
    peft, kohya = (t[0] for t in r["texts"])
    assert "motion LoRA: 360/360 tensors applied (180 layers)" in peft
    assert "motion LoRA: 540/540 tensors applied (180 layers)" in kohya
    assert r["same_keys"] and r["keys"] == 180 and r["max_abs_diff"] == 0.0, r
    assert r["unpatched"] and not r["added_to_input"]


@pytest.mark.bad_input
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tag, message", [
    ("misfit", "its 240 motion layers do not fit the motion model"),
    ("image_only", "has no motion-module tensors: it is an image LoRA; use STD LoRA Loader"),
    ("no_lora_b", "damaged"),
    ("missing", "lora_name: 'nope.safetensors' was not found in the models/loras folder"),
])
def test_a_motion_lora_that_does_not_fit_is_refused_before_sampling(results, layout, tag, message):
    refusal = scenario(results, f"sdxl_{layout}")["refusals"][tag]
    assert refusal["valid"] and not refusal["success"], refusal
    error = refusal["errors"][0]
    assert error.startswith("lora_name: ") and message in error and "Traceback" not in error, error
    assert not refusal["sampled"], "the refusal came after sampling had started"
    if tag == "misfit":  # names the first layers that are missing and of another size
        assert "60 layer(s) it lacks (e.g. down_blocks.3.motion_modules.0." in error
        assert "of another size (e.g. up_blocks.1.motion_modules.0." in error
    if tag == "no_lora_b":  # names the file and the layer that lacks its lora_B
        dropped = results["files"]["dropped_lora_b"]
        assert error.startswith("lora_name: 'sdxl_no_lora_b.safetensors'")
        assert dropped[len("unet."):-len(".lora_B.weight")] in error


def test_comfyui_with_animatediff_evolved_gives_the_diffusers_output_when_frames_are_normalised_alike(results):
    """One UNet call on 4 frames at timestep 499: ComfyUI (STD LoRA Loader, AnimateDiff-Evolved's loader, STD Motion
    LoRA, Apply, Use Evolved Sampling) against std_hf (single-file UNet, image layers merged, MotionAdapter,
    UNetMotionModel, FusedMotionLora), with diffusers' motion-module GroupNorm made per frame."""
    r = scenario(results, "sd15_diffusers_equality")
    assert r["finite"] and r["comfy_unet_dtype"] == "torch.float32" and r["timestep"] == 499.0
    assert r["mm_info"].endswith(":v3:AnimateDiff:SD1.5")
    assert "motion LoRA: 480/480 tensors applied (240 layers)" in r["node_text"][0]
    assert r["module_line"].endswith("560/560 tensors loaded")
    assert (r["image_layers"], r["motion_layers"], r["fused_layers"], r["norms_switched"]) == (72, 240, 240, 20)
    assert r["rel_per_frame"] <= TOLERANCE, r


def test_group_norm_over_all_frames_is_the_difference_that_remains(results):
    """What docs/video.md and motion_format.NORM_ACROSS_FRAMES state: diffusers (what STD trained with) normalises a
    motion module's input over the clip's frames together, AnimateDiff-Evolved frame by frame; on frames of different
    brightness that difference is far above the tolerance the implementations otherwise meet."""
    assert NORM_ACROSS_FRAMES == {"diffusers": True, "animatediff-evolved": False}
    r = scenario(results, "sd15_diffusers_equality")
    assert r["rel_across_frames"] > 10 * TOLERANCE, r
    assert r["rel_across_frames"] > 100 * max(r["rel_per_frame"], 1e-6), r


def test_one_module_in_the_hotshot_xl_and_the_animatediff_sdxl_layout_gives_one_output(results):
    """The SDXL test module is written in both layouts from the same weights (Hotshot-XL's positional tables cut to
    its 24 frames): AnimateDiff-Evolved reads both to the same model, and the LoRA patches it the same way."""
    a, b = (scenario(results, f"sdxl_{layout}")["latents"] for layout in LAYOUTS)
    assert a["plain"] == b["plain"] and a["lora"] == b["lora"]
