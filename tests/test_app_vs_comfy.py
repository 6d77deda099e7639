"""The Gradio app and the ComfyUI nodes run the same STD timesteps and noise for the same settings.

Real-host tests: they skip unless COMFYUI_PATH points at a ComfyUI checkout (see tests/conftest.py).
"""

import pytest
import torch

from comfyui_std.core.noise import start_noise
from std_app import tiny
from std_app.engine import StyleSettings
from std_app.startup import ModelOptions, load_engine


@pytest.fixture(scope="module")
def app_engine(tmp_path_factory):
    """The app's engine on the tiny SD1.5 pipeline (same 1000-step scaled_linear schedule as SD1.5 checkpoints)."""
    root = tiny.build_tiny_models(tmp_path_factory.mktemp("tiny"), "sd15")
    return load_engine(ModelOptions(base=tiny.base_name("sd15"), models_dir=root, device="cpu", dtype="fp32"))


@pytest.mark.parametrize("nfe, eta, plan", [(8, 0.75, "official"), (4, 0.65, "official"), (4, 0.95, "official"),
                                            (1, 0.75, "official"), (6, 0.85, "trained_start"),
                                            (8, 0.65, "trained_start")])
def test_app_runs_the_sigmas_of_the_schedule_node(host, tiny_models, app_engine, nfe, eta, plan):
    model = tiny_models[0]
    node = host.M["STDSchedule"].execute(model, nfe, eta, plan)
    comfy_sigmas = node.result[0]
    result = app_engine.run(torch.rand(1, 32, 32, 3), StyleSettings(nfe=nfe, start_strength=eta, plan=plan, cfg=1.0))
    app_sigmas = app_engine.sigmas(result.plan)
    ms = model.get_model_object("model_sampling")
    assert ms.timestep(comfy_sigmas[:-1]).tolist() == list(result.plan.timesteps)
    assert torch.allclose(app_sigmas, comfy_sigmas.float(), rtol=1e-5, atol=1e-6)
    assert f"start timestep {result.plan.start_timestep}" in node.ui["text"][0]


def test_app_start_noise_is_the_noise_of_the_comfyui_nodes(host):
    import comfy.sample

    latents = torch.zeros(4, 4, 8, 8)
    # STDStylize: prepare_noise on the whole batch; STDStylizeVideo (shared): prepare_noise on frame 0, repeated
    assert torch.equal(comfy.sample.prepare_noise(latents, 123), start_noise(latents, 123, "per_frame"))
    shared = comfy.sample.prepare_noise(latents[:1], 123).expand(4, -1, -1, -1)
    assert torch.equal(shared, start_noise(latents, 123, "shared"))
