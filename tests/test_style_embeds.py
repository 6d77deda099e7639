"""One style-reference path for the app and the trainer: the same IP-Adapter checks, and the same image gives the
same CLIP embeddings in the app engine, the trainer's teacher and (host test) ComfyUI's CLIP vision preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_std.core.errors import STDInputError
from std_app.engine import StyleSettings
from std_app.media import read_image
from std_app.startup import load_engine, tiny_options
from std_app.tiny import TINY_FILES
from std_hf.ip_adapter import clip_pixels, prepare_style_adapter
from training.common.config import config_from_argv
from training.common.trainer import Trainer
from training.std.method import PRESETS, STDConfig, STDMethod
from train_helpers import image_folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return root, load_engine(tiny_options("sd15", root))


def test_app_engine_and_trainer_teacher_get_the_same_embeddings(zoo, tmp_path):
    root, engine = zoo
    style = tmp_path / "style.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(style)
    image, _, _ = read_image(style, "style image", 4096)  # what the app's handlers give the engine
    _, app = engine._style_embeds(StyleSettings(), image)
    cfg = config_from_argv(STDConfig, PRESETS, [
        "--preset", "tiny", "--data", str(image_folder(tmp_path / "data", 2)), "--output", str(tmp_path / "out"),
        "--num-previews", "0", "--style-image", str(style), "--ip-adapter", str(root / "ipadapter" /
                                                                                   TINY_FILES["ip_adapter"]),
        "--image-encoder", str(root / "clip_vision" / TINY_FILES["image_encoder"])])
    trainer = Trainer(cfg, STDMethod)
    trainer.method.setup()
    teacher = trainer.method.style_ref.embeds
    assert teacher.shape == app[:, 0].shape == (1, 16)
    assert torch.equal(app[:, 0].float(), teacher)
    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(other)
    _, app_other = engine._style_embeds(StyleSettings(), read_image(other, "style image", 4096)[0])
    assert not torch.allclose(app_other, app)  # the embeddings depend on the image


@pytest.mark.bad_input
def test_an_adapter_for_another_base_is_refused_by_the_shared_check(zoo, tmp_path):
    from std_app.tiny import write_ip_adapter
    from std_hf.tiny import make_unet

    root, engine = zoo
    sdxl_adapter = write_ip_adapter(make_unet("sdxl"), tmp_path / "ip_sdxl.safetensors")
    with pytest.raises(STDInputError, match="ipadapter: this is an cross-attention width 64 IP-Adapter"):
        prepare_style_adapter(engine.pipe.unet, sdxl_adapter, root / "clip_vision" / TINY_FILES["image_encoder"],
                              "tiny-sd15")


def test_clip_pixels_are_comfyuis_clip_vision_preprocessing(host):
    import comfy.clip_vision

    g = torch.Generator().manual_seed(0)
    for h, w in ((45, 70), (300, 224), (224, 224), (17, 23)):
        rgb = torch.rand(h, w, 3, generator=g)
        ours = clip_pixels(rgb, 224)
        theirs = comfy.clip_vision.clip_preprocess(rgb[None], 224, crop=True)
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        assert torch.equal(ours, theirs), (h, w, (ours - theirs).abs().max())


@pytest.mark.bad_input
@pytest.mark.parametrize("change, message", [
    ("drop", "missing tensor vision_model.post_layernorm.bias"),
    ("add", "unexpected tensor vision_model.extra.weight"),
])
def test_an_image_encoder_file_with_missing_or_foreign_tensors_is_refused_naming_them(zoo, tmp_path, change, message):
    from safetensors.torch import load_file, save_file

    root, engine = zoo
    sd = load_file(str(root / "clip_vision" / TINY_FILES["image_encoder"]))
    if change == "drop":
        del sd["vision_model.post_layernorm.bias"]
    else:
        sd["vision_model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "enc.safetensors"))
    with pytest.raises(STDInputError, match=rf"^image encoder: 'enc.safetensors': image encoder: {message}"):
        prepare_style_adapter(engine.pipe.unet, root / "ipadapter" / TINY_FILES["ip_adapter"],
                              tmp_path / "enc.safetensors", "tiny-sd15")
