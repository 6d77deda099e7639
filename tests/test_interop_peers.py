"""Interop with VideoHelperSuite, AnimateDiff-Evolved and IPAdapter_plus, against their real code.

``tools/peers_host.py`` boots ComfyUI with this pack and the three peer packs in a process of its own (they change
global state), runs every scenario once and writes what it measured; these tests assert on those results. They
skip (fail under STD_NO_SKIP=1) unless COMFYUI_PATH is set and the peer packs are found ($STD_PEERS_PATH, else
``shared/peers`` beside the repository).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import comfy_host
from tools import peers_host

REPO = Path(__file__).resolve().parents[1]
INTEROP = [p.stem for p in peers_host.interop_workflows()]
pytestmark = pytest.mark.host

#: which scenario run executed each interop workflow as shipped (with the test's files and short settings)
WORKFLOW_RUNS = {"interop_vhs_video": ("vhs_stylize_combine", ("run",)),
                 "interop_ipadapter_plus_style": ("ipadapter_plus_loader", ("runs", "ipa_plus")),
                 "interop_animatediff_video": ("ade_motion", ("runs", "ade_a"))}
#: interop workflows that a test file of their own executes with the files they need (SDXL-layout models): their
#: round trip is checked here with the others
EXECUTED_ELSEWHERE = {"interop_animatediff_motion_lora": "tests/test_interop_motion_lora.py"}
REPLACING = ["sqrt_linear (AnimateDiff)", "autoselect", "linear (AnimateDiff-SDXL)"]
REFUSAL = "the model's noise schedule was replaced"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not comfy_host.comfyui_path():
        pytest.skip(comfy_host.REAL_HOST_REASON)
    peers = comfy_host.peers_path()
    missing = comfy_host.missing_peers(peers)
    if missing:
        pytest.skip(f"interop test: the peer packs {', '.join(missing)} are not in {peers} (set "
                    f"{comfy_host.PEERS_ENV} to a folder holding {', '.join(comfy_host.PEER_PACKS)})")
    work = tmp_path_factory.mktemp("peers")
    log = work / "peers_host.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(Path(peers_host.__file__)), "--base", str(work / "base"),
                               "--results", str(work / "results.json"), "--peers", str(peers)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=1500, cwd=REPO,
                              env={**os.environ, "PYTHONPYCACHEPREFIX": str(work / "pycache")})
    assert proc.returncode == 0, f"peers host exited with {proc.returncode}:\n{log.read_text()[-6000:]}"
    return json.loads((work / "results.json").read_text())


def scenario(results, name):
    r = results["scenarios"].get(name)
    assert r is not None, f"scenario {name} did not run"
    assert r["ok"], f"scenario {name} raised in the peers host:\n{r['error']}"
    return r


def succeeded(run):
    assert run["valid"], f"ComfyUI refused the prompt: {run['errors']}"
    assert run["success"], f"execution failed: {run['errors']}"
    return run


def test_peer_packs_load_and_nothing_is_written_into_their_trees(results):
    assert results["loaded"] == {"comfyui-std": True, **{name: True for name in comfy_host.PEER_PACKS}}
    assert results["tree_changes"] == {"comfyui": [], "peers": []}


@pytest.mark.parametrize("stem", INTEROP)
def test_interop_ui_workflow_converts_to_its_api_twin(results, stem):
    r = scenario(results, "workflows_round_trip")[stem]
    assert r["equal"], f"{stem}: UI file and API twin differ in nodes {r['differences']}"


@pytest.mark.parametrize("stem", [stem for stem in INTEROP if stem not in EXECUTED_ELSEWHERE])
def test_interop_api_workflow_executes(results, stem):
    name, path = WORKFLOW_RUNS[stem]
    run = scenario(results, name)
    for key in path:
        run = run[key]
    succeeded(run)
    saved = [item for out in run["outputs"].values() for kind in ("images", "gifs") for item in out.get(kind, [])]
    assert saved, f"{stem} saved nothing: {run['outputs']}"
    assert any("start timestep" in t for out in run["outputs"].values() for t in out.get("text", []))


# ------------------------------------------------------------------------------------ VideoHelperSuite

def test_vhs_load_video_through_std_stylize_video_into_video_combine_and_std_save_video(results):
    r = scenario(results, "vhs_stylize_combine")
    succeeded(r["run"])
    # 12 frames at 12 fps, VHS force_rate 8 and frame_load_cap 6 -> 6 frames at 8 fps (VIDEO_INFO loaded_fps)
    assert [(c["frames"], c["fps"]) for c in r["combine"]] == [(6, 8.0)], r["combine"]
    assert r["combine"][0]["audio_streams"] == 1, "VHS Video Combine dropped the audio VHS Load Video passed on"
    assert [(c["frames"], c["fps"], c["width"], c["height"]) for c in r["std_save"]] == [(6, 8.0, 64, 64)]
    assert r["std_save"][0]["audio_streams"] == 1, "STD Save Video dropped the AUDIO VHS Load Video passed on"
    # 6 frames in chunks of 4 with overlap 1 -> 2 chunks of 2 steps each
    assert r["stylize_progress"] == [[1, 2], [2, 2], [1, 2], [2, 2]]


def test_vhs_load_video_into_std_save_video_keeps_frames_and_the_ntsc_rate(results):
    r = scenario(results, "vhs_load_to_std_save")
    succeeded(r["run"])
    # 10 frames at 30000/1001 fps, skip 2, every 2nd -> frames 2, 4, 6, 8 at 15000/1001 fps
    assert r["vhs"]["frames"] == 4 and r["vhs"]["loaded_fps"] == pytest.approx(15000 / 1001)
    assert r["saved"]["frames"] == r["vhs"]["frames"]
    assert r["saved"]["fps_fraction"] == "15000/1001", r["saved"]
    assert r["pixel_mean_abs_diff"] is not None, "saved frames have another size than VHS's IMAGE"
    assert r["pixel_mean_abs_diff"] < 0.04, "the frames read back are not the frames VHS loaded"


def test_vhs_load_video_audio_output_carries_the_clips_track(results):
    """What an audio scenario through STD Save Video will build on: VHS's AUDIO output holds the clip's track."""
    audio = scenario(results, "vhs_load_to_std_save")["vhs_audio"]
    assert audio["input_audio_streams"] == 1
    assert audio["sample_rate"] == 48000 and audio["waveform_shape"][:2] == [1, 1]
    assert abs(audio["waveform_shape"][2] - 48000) <= 2048, audio  # 1 s, give or take an AAC frame
    assert 0.2 < audio["peak"] < 0.5  # the 0.3-amplitude sine, not silence


def test_std_load_video_into_vhs_video_combine(results):
    r = scenario(results, "std_load_to_vhs_combine")
    succeeded(r["run"])
    assert (r["saved"]["frames"], r["saved"]["fps"]) == (6, 8.0) and r["loaded_frames"] == 6
    assert r["pixel_mean_abs_diff"] is not None and r["pixel_mean_abs_diff"] < 0.04


# -------------------------------------------------------------------------------------- IPAdapter_plus

def test_ipadapter_plus_loader_output_gives_the_same_result_as_ours(results):
    r = scenario(results, "ipadapter_plus_loader")
    for run in r["runs"].values():
        succeeded(run)
    payload = r["payload"]
    assert payload["top_keys"] == [["image_proj", "ip_adapter"]] * 2
    assert payload["section_keys_equal"] == {"image_proj": True, "ip_adapter": True}
    assert payload["tensors_equal"] and payload["tensor_count"] == 24  # proj/norm + to_k/to_v of 10 layers
    # the same tensors in the same layout: bit-identical latents and PNGs
    assert r["latents_equal"], f"latents differ by up to {r['latents_max_abs_diff']}"
    assert r["images_equal"]
    assert r["reference_effect"] > 1e-3, "the style reference did not change the output, so equality proves nothing"


@pytest.mark.bad_input
@pytest.mark.parametrize("name, message", [("tiny_plus.safetensors", "IP-Adapter Plus (resampler) files are not "
                                                                    "supported"),
                                           ("tiny_faceid.safetensors", "FaceID / full-face IP-Adapter files are not "
                                                                       "supported")])
def test_ipadapter_plus_loader_output_of_unsupported_adapters_is_refused(results, name, message):
    r = scenario(results, "ipadapter_plus_unsupported_files")[name]
    assert not r["success"] and r["errors"] and message in r["errors"][0], r["errors"]
    assert not r["sampled"]


# --------------------------------------------------------------------------------- AnimateDiff-Evolved

def test_ade_use_existing_keeps_the_models_schedule_and_the_std_plan(results):
    r = scenario(results, "ade_schedules")
    entry = r["betas"]["use existing"]
    assert entry["equals_own"] and entry["steps"] == 1000
    assert entry["std_sigmas"] == r["plain_sigmas"], "STD Schedule gives other sigmas on ADE's model"
    texts = scenario(results, "ade_motion")["texts"]
    assert texts["ade_a"] == texts["plain_a"] and "start timestep 499" in texts["ade_a"][0]  # NFE 1 at η 0.75


def test_ade_autoselect_picks_sqrt_linear_for_an_sd15_animatediff_module(results):
    r = scenario(results, "ade_schedules")
    assert r["motion_info"].endswith(":v3:AnimateDiff:SD1.5"), r["motion_info"]
    assert r["autoselect_pick"] == "sqrt_linear (AnimateDiff)"
    assert r["betas"]["autoselect"]["max_rel_diff"] == r["betas"]["sqrt_linear (AnimateDiff)"]["max_rel_diff"]


@pytest.mark.bad_input
@pytest.mark.parametrize("beta", REPLACING)
def test_ade_beta_schedule_that_replaces_the_schedule_is_refused(results, beta):
    direct = scenario(results, "ade_schedules")["betas"][beta]
    assert not direct["equals_own"] and direct["max_rel_diff"] > 0.1  # really another schedule
    assert REFUSAL in direct.get("std_error", ""), direct
    refused = scenario(results, "ade_motion")["refusals"][beta]
    assert not refused["success"] and refused["errors"] and REFUSAL in refused["errors"][0], refused
    assert "use existing" in refused["errors"][0]
    assert not refused["sampled"], "the refusal came after sampling had started"


def test_ade_beta_schedule_equal_to_the_models_own_is_accepted(results):
    """'linear (HotshotXL/default)' rebuilds the 0.00085-0.012 schedule SD1.5 and SDXL already use: no refusal."""
    r = scenario(results, "ade_schedules")
    entry = r["betas"]["linear (HotshotXL/default)"]
    assert entry["equals_own"] and entry["std_sigmas"] == r["plain_sigmas"]


def test_ade_motion_module_acts_and_mixes_frames(results):
    r = scenario(results, "ade_motion")
    files = r["files"]
    assert files["lossless_first_frames_equal"], "precondition: the two clips must share frames 0 and 1 exactly"
    assert files["motion_module_tensors"] == 20 * 28  # 8 down + 12 up temporal modules, 28 tensors each
    for run in r["runs"].values():
        succeeded(run)
        assert [(v["frames"], v["fps"]) for v in run["saved"]] == [(3, 8.0)]
    assert r["shape"] == [3, 4, 8, 8]
    assert r["ade_effect"] > 1e-3 * r["scale"], "the motion module did not change the output"
    # only frame 2 of the input differs: without ADE frame 0 of the output is untouched, with it frame 0 follows
    assert r["plain_frame2_change"] > 1e-3 * r["scale"]
    assert r["plain_frame0_change"] <= 1e-6 * r["scale"]
    assert r["ade_frame0_change"] > 1e-3 * r["plain_frame2_change"], "frames do not interact through ADE"


# -------------------------------------------------------------------------------------------- the tool

@pytest.mark.bad_input
@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "nothing to do: pass --regenerate"),
    (["--regenerate", "--peers", "no/such/folder"], {}, "--peers: 'no/such/folder' is not a folder"),
    (["--regenerate", "--peers", "tests"], {}, "lacks ComfyUI-VideoHelperSuite"),
    (["--regenerate"], {"COMFYUI_PATH": ""}, "set COMFYUI_PATH"),
])
def test_workflow_format_cli_refuses_bad_arguments(argv, env, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.workflow_format", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"), **env})
    assert proc.returncode == 2 and "error: " in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
