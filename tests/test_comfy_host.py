"""Real-host tests: the pack loaded by ComfyUI 0.3.64 on CPU, nodes run directly and through the executor.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools import comfy_host
from comfyui_std.core import DiscreteSchedule, std_plan
from comfyui_std.core.video import load_video, save_video

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "example_workflows" / "api"
#: interop_* workflows need VideoHelperSuite / AnimateDiff-Evolved / IPAdapter_plus nodes: they are executed and
#: round-tripped in the peers host (tests/test_interop_peers.py), never loaded into this session's host
API_WORKFLOWS = sorted(p for p in API_DIR.glob("*.json") if not p.stem.startswith("interop_"))
STD_NODES = {"STDSampler", "STDSchedule", "STDStylize", "STDLoraLoader", "STDIPAdapterLoader", "STDStyleReference",
             "STDLoadVideo", "STDStylizeVideo", "STDSaveVideo", "SiDOneStep", "SiDSchedule"}


def test_pack_loads_like_a_clone_in_custom_nodes(host):
    assert STD_NODES <= set(host.M)
    assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS["STDStylize"] == "STD Stylize"
    web_dirs = {Path(p).resolve() for p in host.nodes.EXTENSION_WEB_DIRS.values()}
    assert (REPO / "web").resolve() in web_dirs
    for name in STD_NODES:  # every input carries a tooltip
        info = host.M[name].GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for inp, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


@pytest.mark.parametrize("nfe, eta, plan", [(8, 0.75, "official"), (4, 0.65, "official"), (6, 0.95, "trained_start")])
def test_schedule_node_gives_the_core_plan(host, tiny_models, nfe, eta, plan):
    model = tiny_models[0]
    out = host.M["STDSchedule"].execute(model, nfe, eta, plan)
    sigmas = out.result[0]
    ms = model.get_model_object("model_sampling")
    p = std_plan(nfe, eta, plan)
    assert ms.timestep(sigmas[:-1]).tolist() == list(p.timesteps)
    assert sigmas[-1] == 0
    assert torch.allclose(sigmas, p.sigmas(DiscreteSchedule()), rtol=1e-5, atol=1e-6)
    assert f"start timestep {p.start_timestep}" in out.ui["text"][0] and f"NFE {nfe}" in out.ui["text"][0]


def _encode(host, tiny_models, text="a painting"):
    with torch.inference_mode():
        return _encode_inner(host, tiny_models, text)


def _encode_inner(host, tiny_models, text):
    _, clip, vae = tiny_models
    enc = host.M["CLIPTextEncode"]()
    pos, neg = enc.encode(clip, text)[0], enc.encode(clip, "")[0]
    img = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    return pos, neg, host.M["VAEEncode"]().encode(vae, img)[0]


def test_std_sampler_gamma0_equals_euler_and_stylize_equals_samplercustom(host, tiny_models):
    import comfy.sample
    import comfy.samplers

    model = tiny_models[0]
    with torch.inference_mode():
        pos, neg, lat = _encode(host, tiny_models)
        sigmas = host.M["STDSchedule"].execute(model, 4, 0.75).result[0]
        noise = comfy.sample.prepare_noise(lat["samples"], 7)
        run = lambda sampler: comfy.sample.sample_custom(model, noise, 2.0, sampler, sigmas, pos, neg, lat["samples"],
                                                         disable_pbar=True, seed=7)
        std = run(host.M["STDSampler"].execute(0.0).result[0])
        euler = run(comfy.samplers.ksampler("euler"))
        assert (std - euler).abs().max() < 1e-4 * max(1.0, euler.abs().max().item())
        custom = host.M["SamplerCustom"]().sample(model, True, 7, 2.0, pos, neg,
                                                   host.M["STDSampler"].execute(0.3).result[0], sigmas, lat)[0]
        allin1 = host.M["STDStylize"].execute(model, pos, neg, lat, 7, 4, 0.75, 0.3, 2.0).result[0]
        assert torch.allclose(custom["samples"], allin1["samples"], atol=1e-5)
        stoch = host.M["STDStylize"].execute(model, pos, neg, lat, 8, 4, 0.75, 0.3, 2.0).result[0]
        assert not torch.allclose(stoch["samples"], allin1["samples"])


def test_lora_loader_applies_every_layer_of_a_peft_lora(host, tiny_models, host_files, caplog):
    model = tiny_models[0]
    with caplog.at_level(logging.WARNING):
        out = host.M["STDLoraLoader"].execute(model, host_files["lora"], 1.0)
    patched, eta, t_init = out.result
    assert t_init == 625  # no SiD metadata: the default
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert eta == 0.75
    assert f"{host_files['layers']}/{host_files['layers']} layers applied" in out.ui["text"][0]
    assert len(patched.patches) == host_files["layers"]
    assert model.patches == {} or len(model.patches) == 0  # input model untouched


def test_core_lora_loader_misses_peft_keys_that_ours_applies(host, tiny_models, host_files):
    """Why STDLoraLoader exists: ComfyUI's own loader skips the attention keys of diffusers/PEFT files."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(host.base / "models" / "loras" / host_files["lora"]))
    core_patched, _ = comfy.sd.load_lora_for_models(tiny_models[0], None, sd, 1.0, 0)
    assert len(core_patched.patches) < host_files["layers"]


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_executes(host, tiny_ckpt, host_files, workflow):
    prompt = comfy_host.prepare_workflow(workflow, tiny_ckpt, host_files)
    ex, server = comfy_host.execute(prompt)
    errors = [d for e, d in server.events if e == "execution_error"]
    assert ex.success, errors
    files = [img for out in ex.history_result["outputs"].values() for img in out.get("images", [])]
    assert files, ex.history_result["outputs"]
    video = "video" in workflow.stem
    for item in files:
        f = host.base / "output" / item["subfolder"] / item["filename"]
        if video:  # 24 frames at 12 fps, resampled to 8 fps and capped at 16, read back from the saved mp4
            frames, info = load_video(f)
            assert (info.frame_count, info.fps, info.width, info.height) == (16, 8.0, 64, 64)
        else:
            assert Image.open(f).size == (64, 64)
    progress = [d for e, d in server.events if e == "progress"]
    samplers = ("STDStylize", "STDStylizeVideo", "STDStylizeVideoFile", "SamplerCustom", "SiDOneStep")
    sampler_node = next(k for k, v in prompt.items() if v["class_type"] in samplers)
    texts = [t for out in ex.history_result["outputs"].values() for t in out.get("text", [])]
    if prompt[sampler_node]["class_type"] == "SiDOneStep":  # one network evaluation
        assert [(d["value"], d["max"]) for d in progress if d["node"] == sampler_node] == [(1, 1)]
        assert any("SiD one step at t_init 625" in t for t in texts)
        return
    chunks = 3 if video else 1  # 16 frames, 8 per batch, overlap 2 -> 3 chunks
    assert [(d["value"], d["max"]) for d in progress if d["node"] == sampler_node] == [(1, 3), (2, 3), (3, 3)] * chunks
    assert any("start timestep" in t for t in texts)


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_converts_to_its_api_twin(host, workflow):
    """The UI file queues what its API twin says, in this host's layout (0.33's frontend queues core Save Video's
    nested codec as ``format.codec``; 0.3.x as a top-level ``codec``)."""
    from tools.workflow_format import dynamic_form, ui_to_api

    ui = json.loads((REPO / "example_workflows" / workflow.name).read_text())
    assert ui_to_api(ui, host.nodes) == dynamic_form(json.loads(workflow.read_text()), host.nodes)


def test_core_save_video_runs_in_both_prompt_layouts(host, tiny_ckpt, host_files):
    """std_video_core_video ends in core Save Video: queued as the 0.33 frontend writes it (``format.codec``) and as
    the API twin ships (top-level ``codec``), it runs on this host and saves the video (a converter that dropped
    the nested codec, or a host that no longer takes the older layout, fails here)."""
    from tools.workflow_format import dynamic_form

    shipped = comfy_host.prepare_workflow(API_DIR / "std_video_core_video.json", tiny_ckpt, host_files)
    for prompt in (shipped, dynamic_form(shipped, host.nodes)):
        ex, server = comfy_host.execute(prompt)
        assert ex.success, [d for e, d in server.events if e == "execution_error"]
        saved = ex.history_result["outputs"]["11"]["images"]
        assert saved and (host.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]).is_file()


def test_interrupt_stops_sampling(host, tiny_ckpt, host_files):
    import comfy.model_management

    steps = []

    def on_step(value, total):
        steps.append(value)
        comfy.model_management.interrupt_current_processing(True)

    prompt = comfy_host.prepare_workflow(API_DIR / "std_image_stylize.json", tiny_ckpt, host_files)
    prompt["7"]["inputs"]["seed"] = 1234  # not cached
    try:
        ex, server = comfy_host.execute(prompt, on_step=on_step)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not ex.success, (steps, [e for e, _ in server.events])
    assert "execution_interrupted" in [e for e, _ in server.events]
    assert steps == [1]


def _expect_error(prompt, fragment):
    ex, server = comfy_host.execute(prompt)
    assert not ex.success
    msgs = [d["exception_message"] for e, d in server.events if e == "execution_error"]
    assert msgs and fragment in msgs[0], msgs
    return msgs[0]


def test_bad_inputs_give_clear_errors_and_the_server_keeps_running(host, tiny_ckpt, host_files):
    import asyncio

    import execution

    base = comfy_host.prepare_workflow(API_DIR / "std_image_stylize.json", tiny_ckpt, host_files)
    # 1) out of range widget: ComfyUI's validation names the input
    bad = json.loads(json.dumps(base))
    bad["7"]["inputs"]["start_strength"] = 1.5
    ok, err, _, node_errors = asyncio.run(execution.validate_prompt("x", bad, None))
    assert not ok and "start_strength" in json.dumps(node_errors)
    # 2) too many steps for the grid at this η: our message
    bad = json.loads(json.dumps(base))
    bad["7"]["inputs"]["nfe"] = 40
    _expect_error(bad, "nfe 40 at start_strength 0.75 needs")
    # 3) missing LoRA file
    bad = json.loads(json.dumps(base))
    bad["2"]["inputs"]["lora_name"] = "nope.safetensors"
    _expect_error(bad, "lora_name: 'nope.safetensors' was not found in the models/loras folder")
    # 4) corrupt LoRA file
    (host.base / "models" / "loras" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    bad = json.loads(json.dumps(base))
    bad["2"]["inputs"]["lora_name"] = "corrupt.safetensors"
    _expect_error(bad, "could not read 'corrupt.safetensors'")
    # the server still runs a good prompt afterwards
    good = json.loads(json.dumps(base))
    good["7"]["inputs"]["seed"] = 99
    ex, _ = comfy_host.execute(good)
    assert ex.success


def test_wrong_base_lora_is_rejected(host, tiny_models):
    from safetensors.torch import save_file

    path = host.base / "models" / "loras" / "sdxl_like.safetensors"
    save_file({"unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2.to_q.lora_A.weight": torch.zeros(4, 1280),
               "unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2.to_q.lora_B.weight": torch.zeros(1280, 4)},
              str(path))
    with pytest.raises(ValueError, match="made for another base model"):
        host.M["STDLoraLoader"].execute(tiny_models[0], path.name, 1.0)


def test_unsupported_models_and_latents(host, tiny_models):
    import comfy.model_sampling as cms

    model = tiny_models[0]
    pos, neg, lat = _encode(host, tiny_models)
    flow = model.clone()

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    flow.add_object_patch("model_sampling", Flow(None))
    with pytest.raises(ValueError, match="flow-matching"):
        host.M["STDSchedule"].execute(flow, 8, 0.75)
    same = host.M["ModelSamplingDiscrete"]().patch(model, "eps", False)[0]  # a patch that keeps the schedule is fine
    assert torch.equal(host.M["STDSchedule"].execute(same, 4, 0.75).result[0],
                       host.M["STDSchedule"].execute(model, 4, 0.75).result[0])
    zsnr = host.M["ModelSamplingDiscrete"]().patch(model, "eps", True)[0]
    with pytest.raises(ValueError, match="noise schedule was replaced"):
        host.M["STDSchedule"].execute(zsnr, 4, 0.75)
    lcm = host.M["ModelSamplingDiscrete"]().patch(model, "lcm", False)[0]
    with pytest.raises(ValueError, match="1000-step schedule"):
        host.M["STDStylize"].execute(lcm, pos, neg, lat, 0, 4, 0.75, 0.0, 1.0)
    wrong = {"samples": torch.randn(1, 16, 8, 8)}
    with pytest.raises(ValueError, match="latent_image: latent has 16 channels but this model uses 4"):
        host.M["STDStylize"].execute(model, pos, neg, wrong, 0, 4, 0.75, 0.0, 1.0)
    with pytest.raises(ValueError, match="latent_image: expected an image latent"):
        host.M["STDStylize"].execute(model, pos, neg, {"samples": torch.randn(1, 4, 2, 8, 8)}, 0, 4, 0.75, 0.0, 1.0)
    with pytest.raises(ValueError, match="gamma: got 2.0"):
        host.M["STDSampler"].execute(2.0)
    with pytest.raises(ValueError, match=r"start_strength: got 0.0, allowed range is \(0.0, 1.0\]"):
        host.M["STDSchedule"].execute(model, 8, 0.0)


def test_latent_previews_are_sent_each_step(host, tiny_ckpt, host_files):
    from comfy.cli_args import LatentPreviewMethod

    prompt = comfy_host.prepare_workflow(API_DIR / "std_image_stylize.json", tiny_ckpt, host_files)
    prompt["7"]["inputs"]["seed"] = 4321
    with comfy_host.preview_method(LatentPreviewMethod.Latent2RGB):
        ex, server = comfy_host.execute(prompt)
    assert ex.success
    previews = [d["preview"] for e, d in server.events if e == "progress" and d["node"] == "7"]
    assert previews == [True, True, True]


@pytest.mark.parametrize("gamma", [0.0, 0.4])
def test_shared_noise_keeps_a_static_video_identical(host, tiny_models, gamma):
    pos, neg, _ = _encode(host, tiny_models)
    _, _, vae = tiny_models
    with torch.inference_mode():
        frame = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
        lat = host.M["VAEEncode"]().encode(vae, frame.repeat(7, 1, 1, 1))[0]
        node = host.M["STDStylizeVideo"]
        shared = node.execute(tiny_models[0], pos, neg, lat, 5, 3, 0.75, gamma, 2.0, 3, 1, "shared").result[0]
        indep = node.execute(tiny_models[0], pos, neg, lat, 5, 3, 0.75, gamma, 2.0, 3, 1, "per_frame").result[0]
    s, i = shared["samples"], indep["samples"]
    assert s.shape == (7, 4, 8, 8)
    # identical up to float rounding of batched kernels (latents here are ~50 in magnitude)
    assert (s - s[:1]).abs().max() <= 1e-6 * s.abs().max()
    assert (i - i[:1]).abs().max() > 1e-2


def test_video_nodes_bad_input(host, tiny_models):
    with pytest.raises(ValueError, match="does not exist"):
        host.M["STDLoadVideo"].execute("", path="relative/clip.mp4")  # relative to the input folder
    (host.base / "input" / "broken.mp4").write_bytes(b"not a video" * 20)
    with pytest.raises(ValueError, match="could not decode 'broken.mp4'"):
        host.M["STDLoadVideo"].execute("broken.mp4")
    with pytest.raises(ValueError, match="no frames left"):
        host.M["STDLoadVideo"].execute("std_content.mp4", skip_first_frames=1000)
    pos, neg, lat = _encode(host, tiny_models)
    with pytest.raises(ValueError, match="overlap"):
        host.M["STDStylizeVideo"].execute(tiny_models[0], pos, neg, lat, 0, 3, 0.75, 0.0, 1.0, 4, 4)
    with pytest.raises(ValueError, match="images: expected an IMAGE batch"):
        host.M["STDSaveVideo"].execute(torch.zeros(0, 8, 8, 3))
    with pytest.raises(ValueError, match="format: got 'avi'"):
        host.M["STDSaveVideo"].execute(torch.zeros(2, 8, 8, 3), 8.0, "STD/bad", "avi")


def test_sid_one_step_equals_the_sampler_custom_path_and_checks_input(host, tiny_models):
    pos, _, _ = _encode(host, tiny_models)
    model = tiny_models[0]
    with torch.inference_mode():
        one = host.M["SiDOneStep"].execute(model, pos, 64, 64, 2, 5, 625).result[0]
        sigmas = host.M["SiDSchedule"].execute(model, 625).result[0]
        empty = {"samples": torch.zeros(2, 4, 8, 8)}
        sampler = host.M["STDSampler"].execute(0.0).result[0]
        custom = host.nodes.NODE_CLASS_MAPPINGS["SamplerCustom"]().sample(model, True, 5, 1.0, pos, pos, sampler,
                                                                           sigmas, empty)[0]
    ms = model.get_model_object("model_sampling")
    assert torch.allclose(sigmas, torch.stack([ms.sigma(torch.tensor(625.0)).reshape(()), torch.tensor(0.0)]))
    assert 2.45 < float(sigmas[0]) < 2.55  # sigma_init ≈ 2.5
    assert torch.allclose(one["samples"], custom["samples"], atol=1e-5)
    with pytest.raises(ValueError, match="t_init"):
        host.M["SiDSchedule"].execute(model, 1000)
    with pytest.raises(ValueError, match="batch_size"):
        host.M["SiDOneStep"].execute(model, pos, 64, 64, 0, 5, 625)
