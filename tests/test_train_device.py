"""The trainers' --device: one check shared with the app, and the device named is the device used (or the run is
refused with a message), never silently another one."""

import pytest
import torch
from train_helpers import image_folder

from comfyui_std.core.errors import STDInputError
from training.common.config import config_from_argv
from training.common.trainer import Trainer, placement
from training.sid_lsg.method import PRESETS as SID_PRESETS
from training.sid_lsg.method import SiDConfig, SiDMethod
from training.std.method import PRESETS, STDConfig, STDMethod


def test_one_process_makes_the_named_gpu_the_current_one(monkeypatch):
    current = {"index": 0}
    calls = []

    def set_device(index):
        calls.append(index)
        current["index"] = index

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    cpu = torch.device("cpu")
    assert placement("cuda:1", torch.device("cuda:1"), 1, cpu) == torch.device("cuda", 1)
    assert calls == [1]  # so libraries that say "cuda" run on GPU 1 too
    assert placement("cuda", torch.device("cuda"), 1, cpu) == torch.device("cuda", 1)  # the current GPU
    assert calls == [1]
    # accelerate's own choice does not override a named device in one process
    assert placement("cpu", cpu, 1, torch.device("cuda", 0)) == cpu


@pytest.mark.bad_input
@pytest.mark.parametrize("asked", ["cuda:1", "cpu"])
def test_several_processes_refuse_a_device_accelerate_did_not_give_them(asked):
    given = torch.device("cuda", 0)
    with pytest.raises(STDInputError, match=rf"device: '{asked}' with 2 processes: accelerate gives each process its "
                                            r"own device \(here cuda:0\)"):
        placement(asked, torch.device(asked), 2, given)


def test_several_processes_take_the_device_accelerate_gives_them():
    given = torch.device("cuda", 1)
    assert placement("auto", torch.device("cuda"), 2, given) == given
    assert placement("cuda", torch.device("cuda"), 2, given) == given
    assert placement("cpu", torch.device("cpu"), 2, torch.device("cpu")) == torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data"), 2)


@pytest.mark.parametrize("method", ["std", "sid_lsg"])
def test_every_model_goes_to_the_trainers_device(method, data, tmp_path):
    """The methods place every model on ``trainer.device`` (here the meta device stands in for a GPU: a model left
    on the CPU, or sent to a device of its own choosing, shows up)."""
    if method == "std":
        cfg = config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--data", str(data), "--output",
                                                    str(tmp_path), "--device", "cpu"])
        trainer = Trainer(cfg, STDMethod)
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\n")
        cfg = config_from_argv(SiDConfig, SID_PRESETS, ["--preset", "tiny", "--prompts", str(prompts), "--output",
                                                        str(tmp_path / "o"), "--device", "cpu"])
        trainer = Trainer(cfg, SiDMethod)
    assert trainer.device == torch.device("cpu")  # as named
    trainer.device = torch.device("meta")
    trainer.method.setup()
    base = trainer.method.base
    models = {"unet": base.unet, "vae": base.vae, **{f"text_encoder{i}": t for i, t in enumerate(base.text_encoders)}}
    for name, model in models.items():
        devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
        assert devices == {"meta"}, (name, devices)
