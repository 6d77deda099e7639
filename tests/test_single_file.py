"""Single-file SD1.5 and SDXL checkpoints in the LDM layout ComfyUI saves, loaded strictly and offline by the shared
loader (std_hf): every tensor of every component compared with the file, agreement with diffusers' own converters,
``python -m training.check_base`` counts and refusals, the trainer from an SD1.5 file with its real text encoder,
and the app from an SDXL file, all with ``HF_HUB_OFFLINE=1`` and an empty Hugging Face cache.

The files are written from tiny diffusers/transformers modules through the reverse maps (``std_hf.ldm.to_ldm``), into
a folder laid out like a ComfyUI install (``ComfyUI/models/checkpoints`` next to ``ComfyUI/comfy/sd1_tokenizer``, here
a byte-level tokenizer), so the tokenizer is found the way a user's would be. tests/test_train_comfy.py builds the
same kind of files with ComfyUI's own classes and compares the models' outputs with ComfyUI's.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from std_hf import ldm, tiny
from std_hf.base import load_base

COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network, an empty Hugging Face cache, and no ComfyUI to fall back on (COMFYUI_PATH unset)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)


def write_checkpoint(path, arch, dtype=torch.float16, seed=0, edit=None):
    parts = tiny.tiny_components(arch, seed, tiny.LDM)
    sd = ldm.to_ldm(parts["unet"], parts["vae"], parts["text_encoder"], parts.get("text_encoder_2"), arch)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    if edit:
        edit(sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return parts


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("install") / "ComfyUI"
    tiny.write_tokenizer(root / "comfy" / "sd1_tokenizer")
    models = root / "models"
    files = {}
    for arch, dtype in (("sd15", torch.float16), ("sdxl", torch.float32)):
        path = models / "checkpoints" / f"tiny_{arch}.safetensors"
        files[arch] = (path, write_checkpoint(path, arch, dtype), dtype)
    return {"root": root, "models": models, "files": files}


def _modules(base):
    out = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoders[0]}
    if base.arch == "sdxl":
        out["text_encoder_2"] = base.text_encoders[1]
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_every_tensor_of_every_component_is_loaded_from_the_file(comfy, arch):
    path, parts, dtype = comfy["files"][arch]
    base = load_base(str(path))
    assert base.arch == arch and base.prediction_type == "epsilon"
    assert [r.name for r in base.reports if r.needed] == ["text_encoder", *(["text_encoder_2"] if arch == "sdxl"
                                                                             else []), "unet", "vae"]
    assert all(r.ok and r.loaded == r.needed > 0 for r in base.reports)
    for name, module in _modules(base).items():
        want, got = parts[name].state_dict(), module.state_dict()
        assert want.keys() == got.keys(), name
        for k in want:  # the file holds the modules' weights rounded to its dtype
            assert torch.equal(got[k], want[k].to(dtype).float()), f"{name}: {k}"
    with safe_open(str(path), "pt") as f:
        n_file = len(list(f.keys()))
    ignored = sum(len(r.ignored) for r in base.reports)
    fused = 0  # OpenCLIP keeps q, k and v in one tensor: three module tensors from one file tensor
    if arch == "sdxl":
        fused = sum(2 for k in parts["text_encoder_2"].state_dict() if k.endswith(("q_proj.weight", "q_proj.bias")))
    assert sum(r.loaded for r in base.reports) + ignored == n_file + fused
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, base.unet.config.cross_attention_dim)
    extra = {}
    if arch == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 40), "time_ids": torch.tensor([[64., 64, 0, 0,
                                                                                                      64, 64]])}}
    with torch.no_grad():
        ref = parts["unet"].to(dtype).float()(x, 500, ctx, **extra).sample
        out = base.unet(x, 500, ctx, **extra).sample
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_the_maps_agree_with_diffusers_own_converters(comfy, arch):
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)

    path, parts, _ = comfy["files"][arch]
    sd = load_file(str(path))
    base = load_base(str(path))
    for name, converted in (("unet", convert_ldm_unet_checkpoint(sd, dict(base.unet.config))),
                            ("vae", convert_ldm_vae_checkpoint(sd, dict(base.vae.config)))):
        got = _modules(base)[name].state_dict()
        assert converted.keys() == got.keys(), name
        assert all(torch.equal(converted[k].float().reshape(got[k].shape), got[k]) for k in got), name
    if arch == "sdxl":
        converted = convert_open_clip_checkpoint(base.text_encoders[1], sd, prefix=ldm.SDXL_TEXT_2)
        got = base.text_encoders[1].state_dict()
        assert converted.keys() == got.keys()
        assert all(torch.equal(converted[k].float(), got[k]) for k in got)


def test_check_base_prints_full_counts(comfy, capsys):
    from training.check_base import main

    for arch in ("sd15", "sdxl"):
        path = comfy["files"][arch][0]
        assert main(["--base", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"architecture: {'SDXL' if arch == 'sdxl' else 'SD1.5'}" in out and "prediction type: epsilon" in out
        for name in COMPONENTS[arch]:
            line = next(x for x in out.splitlines() if x.startswith(f"{name}: loaded "))
            n, _, m = line.split("loaded ")[1].split(" tensors")[0].partition(" / ")
            assert n == m and int(n) > 0, line
        assert str(comfy["root"] / "comfy" / "sd1_tokenizer") in out and "ok: every component" in out


def _drop(key):
    return lambda sd: sd.pop(key)


def _add(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(3))


def _reshape(key):
    return lambda sd: sd.__setitem__(key, sd[key][:-1])


SHORT = [
    ("unet missing", _drop(ldm.UNET + "output_blocks.2.0.out_layers.3.weight"),
     "unet: missing tensor up_blocks.0.resnets.2.conv2.weight"),
    ("vae extra", _add(ldm.VAE + "encoder.down.0.block.0.extra.weight"),
     "vae: unexpected tensor first_stage_model.encoder.down.0.block.0.extra.weight"),
    ("text shape", _reshape(ldm.SD15_TEXT + "text_model.encoder.layers.1.mlp.fc1.bias"),
     "text_encoder: tensor cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.bias: shape (63,)"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, edit, message", SHORT, ids=[c[0] for c in SHORT])
def test_check_base_names_what_is_short_and_exits_1(comfy, tmp_path, capsys, case, edit, message):
    from training.check_base import main

    path = comfy["root"] / "models" / "checkpoints" / f"broken_{case.replace(' ', '_')}.safetensors"
    write_checkpoint(path, "sd15", edit=edit)
    assert main(["--base", str(path)]) == 1
    assert message in capsys.readouterr().out
    with pytest.raises(ValueError, match=message.split(": ", 1)[0]):
        load_base(str(path))  # the trainers and the app refuse the same file


def _lora_file(path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(path))


def _sd2_file(path):
    save_file({ldm.UNET + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 4)}, str(path))


REFUSED = [
    ("missing", lambda p: None, "was not found"),
    ("corrupt", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"), "not a readable .safetensors"),
    ("pickle", lambda p: p.write_bytes(b"\x80\x04K\x01."), "must be .safetensors"),
    ("lora", _lora_file, "not an SD1.5 or SDXL checkpoint"),
    ("sd2", _sd2_file, "SD2.x checkpoint"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("case, make, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_check_base_refuses_unusable_files_with_a_message(tmp_path, capsys, case, make, message):
    from training.check_base import main

    path = tmp_path / ("model.ckpt" if case == "pickle" else "model.safetensors")
    make(path)
    assert main(["--base", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.bad_input
def test_without_tokenizer_files_the_message_says_where_to_get_them(comfy, tmp_path, capsys):
    from training.check_base import main

    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(comfy["files"]["sd15"][0].read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer: .*comfy/sd1_tokenizer.*COMFYUI_PATH"):
        load_base(str(lonely))
    assert main(["--base", str(lonely)]) == 1
    assert "tokenizer: missing tensor tokenizer: the CLIP tokenizer files" in capsys.readouterr().out
    assert load_base(str(lonely), tokenizer=str(comfy["root"] / "comfy" / "sd1_tokenizer")).arch == "sd15"


def test_the_app_takes_the_trainers_tokenizer_option(comfy, tmp_path, capsys):
    """The app loads through the trainer's loader, so a single file far from any ComfyUI install loads in the app with
    --tokenizer, as in the trainer; without it the app gives the loader's message."""
    import gradio_app
    from std_app.startup import ModelOptions, load_engine

    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(comfy["files"]["sd15"][0].read_bytes())
    tokenizer = str(comfy["root"] / "comfy" / "sd1_tokenizer")
    engine = load_engine(ModelOptions(base=str(lonely), tokenizer=tokenizer, device="cpu", dtype="fp32"))
    assert engine.arch == "sd15" and engine.pipe.tokenizer("a cat").input_ids[0] == 512
    with pytest.raises(ValueError, match=r"tokenizer: .*comfy/sd1_tokenizer.*COMFYUI_PATH"):
        load_engine(ModelOptions(base=str(lonely), device="cpu", dtype="fp32"))
    assert gradio_app.main(["--base", str(lonely), "--tokenizer", str(tmp_path), "--device", "cpu"]) == 2
    assert f"error: tokenizer: {tmp_path} has no vocab.json and merges.txt" in capsys.readouterr().err


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs, message", [
    (dict(spec="folder", tokenizer="tok"), "tokenizer: only used with a single-file base; 'tiny-sd15' brings its own"),
    (dict(spec="folder", config="folder"), "base config: only used with a single-file base; 'tiny-sd15' brings"),
    (dict(spec="tiny", config="folder"), "base config: only used with a single-file base; 'tiny' brings"),
    (dict(spec="file", tokenizer="tok", config="folder"), "tokenizer: the base config folder brings its own"),
    (dict(spec="file", config="nowhere"), "base model: 'nowhere' was not found"),
])
def test_tokenizer_and_base_config_are_for_single_files_only(comfy, tmp_path, kwargs, message):
    from std_app.startup import tiny_options

    zoo = tiny_options("sd15", tmp_path / "zoo")
    where = {"folder": str(zoo.models_dir / "diffusers" / "tiny-sd15"), "file": str(comfy["files"]["sd15"][0]),
             "tok": str(comfy["root"] / "comfy" / "sd1_tokenizer"), "tiny": "tiny", "nowhere": "nowhere"}
    kwargs = {k: where[v] for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        load_base(kwargs.pop("spec"), **kwargs)


def test_a_comfyui_install_is_found_through_comfyui_path(comfy, tmp_path, monkeypatch):
    lonely = tmp_path / "elsewhere" / "m.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes(comfy["files"]["sdxl"][0].read_bytes())
    monkeypatch.setenv("COMFYUI_PATH", str(comfy["root"]))
    base = load_base(str(lonely))
    assert base.extra["tokenizer"] == str(comfy["root"] / "comfy" / "sd1_tokenizer")
    assert [t.pad_token for t in base.tokenizers] == ["<|endoftext|>", "!"]  # SDXL's second tokenizer pads with "!"


def test_v_prediction_flag_and_old_text_layout(comfy, tmp_path):
    def vpred(sd):
        sd["v_pred"] = torch.tensor([])
    path = comfy["root"] / "models" / "checkpoints" / "vpred.safetensors"
    write_checkpoint(path, "sdxl", edit=vpred)
    base = load_base(str(path))
    assert base.prediction_type == "v_prediction"
    assert any("v_pred" in r.ignored for r in base.reports)

    def old(sd):  # SD1.x files from before transformers 4.x have no text_model. level
        for k in [k for k in sd if k.startswith(ldm.SD15_TEXT + "text_model.")]:
            sd[ldm.SD15_TEXT + k[len(ldm.SD15_TEXT + "text_model."):]] = sd.pop(k)
    path = comfy["root"] / "models" / "checkpoints" / "old.safetensors"
    parts = write_checkpoint(path, "sd15", edit=old)
    got = load_base(str(path)).text_encoders[0].state_dict()
    want = parts["text_encoder"].state_dict()
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)


def test_the_tiny_preset_trains_from_an_sd15_single_file_with_its_text_encoder(comfy, tmp_path):
    from training.common.config import config_from_argv
    from training.common.trainer import Trainer
    from training.std.method import PRESETS, STDConfig, STDMethod

    path, parts, _ = comfy["files"]["sd15"]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--base", str(path), "--data", str(data),
                                                "--output", str(tmp_path / "out"), "--max-steps", "2",
                                                "--num-previews", "0"])
    trainer = Trainer(cfg, STDMethod)
    history = trainer.run()
    assert len(history) == 2 and all(np.isfinite(h["loss/student"]) for h in history)
    enc = trainer.method.base.text_encoders[0].state_dict()
    want = parts["text_encoder"].state_dict()
    assert all(torch.equal(enc[k], want[k].half().float()) for k in want)  # the file's encoder, not a random one
    log = (tmp_path / "out" / "train.log").read_text()
    assert "text_encoder: loaded 36 / 36 tensors" in log and "unet: loaded" in log


@pytest.mark.parametrize("method", ["std", "std_style", "sid_lsg"])
def test_bf16_training_reads_the_frozen_weights_in_bf16_unless_a_style_lora_is_merged(comfy, tmp_path, monkeypatch,
                                                                                    method):
    """Host RAM: under bf16 the UNet and text encoders are read from the file in bf16 (half the bytes of fp32) and the
    VAE in its own dtype, giving exactly the weights of the fp32 read cast afterwards; a style LoRA is merged in fp32,
    so then they are read in fp32."""
    import std_hf.base as base_module
    from safetensors.torch import save_file as save
    from training.common.config import config_from_argv
    from training.common.trainer import Trainer
    from training.sid_lsg.method import PRESETS as SID_PRESETS, SiDConfig, SiDMethod
    from training.std.method import PRESETS, STDConfig, STDMethod

    path = comfy["files"]["sdxl"][0]  # stored fp32
    read = {}
    original = base_module.materialize

    def spy(module, mapping, source, dtype, report):
        read[report.name] = dtype
        return original(module, mapping, source, dtype, report)

    monkeypatch.setattr(base_module, "materialize", spy)
    common = ["--base", str(path), "--output", str(tmp_path / "out"), "--mixed-precision", "bf16", "--device", "cpu",
              "--resolution", "64", "--lora-rank", "4", "--lora-alpha", "4", "--num-previews", "0"]
    if method == "sid_lsg":
        (tmp_path / "p.txt").write_text("a cat\n")
        cfg = config_from_argv(SiDConfig, SID_PRESETS, [*common, "--prompts", str(tmp_path / "p.txt")])
        trainer = Trainer(cfg, SiDMethod)
    else:
        data = tmp_path / "data"
        data.mkdir()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "0.png")
        extra = []
        if method == "std_style":
            save({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3),
                  "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 1, 1, 1)}, str(tmp_path / "style.safetensors"))
            extra = ["--style-lora", str(tmp_path / "style.safetensors")]
        cfg = config_from_argv(STDConfig, PRESETS, [*common, "--data", str(data), *extra])
        trainer = Trainer(cfg, STDMethod)
    trainer.method.setup()
    frozen = torch.float32 if method == "std_style" else torch.bfloat16
    assert read == {"text_encoder": frozen, "text_encoder_2": frozen, "unet": frozen, "vae": torch.float32}
    monkeypatch.setattr(base_module, "materialize", original)
    reference = load_base(str(path))  # read in fp32, then cast as training does
    got = trainer.method.base
    for name in ("unet", "text_encoders"):
        ours = [got.unet] if name == "unet" else got.text_encoders
        theirs = [reference.unet] if name == "unet" else reference.text_encoders
        for a, b in zip(ours, theirs):
            sa = {k.replace(".base_layer", ""): v for k, v in a.state_dict().items() if ".lora_" not in k}
            sb = b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(torch.bfloat16)) for k in sa), name


def test_the_app_starts_from_an_sdxl_single_file_offline(comfy):
    from std_app.engine import StyleSettings
    from std_app.startup import ModelOptions, load_engine

    path, parts, _ = comfy["files"]["sdxl"]
    engine = load_engine(ModelOptions(base=path.name, models_dir=comfy["models"], device="cpu", dtype="fp32"))
    assert engine.arch == "sdxl"
    got = engine.pipe.text_encoder_2.state_dict()
    assert all(torch.equal(got[k], v) for k, v in parts["text_encoder_2"].state_dict().items())
    out = engine.run(torch.rand(1, 64, 64, 3), StyleSettings(prompt="a cat", nfe=2, cfg=2.0)).frames
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()


def test_a_file_of_another_shape_loads_with_the_configs_of_a_diffusers_folder(tmp_path):
    """The app's --base-config: component configs and tokenizers from a folder, for files whose norms or heads the
    shapes cannot tell (here the app's tiny zoo, 8 norm groups)."""
    from std_app.startup import ModelOptions, load_engine, tiny_options

    zoo = tiny_options("sd15", tmp_path / "zoo")
    folder = zoo.models_dir / "diffusers" / "tiny-sd15"
    base = load_base(str(folder))
    path = tmp_path / "zoo_as_single_file.safetensors"
    save_file(ldm.to_ldm(base.unet, base.vae, base.text_encoders[0], arch="sd15"), str(path))
    with pytest.raises(ValueError, match="do not divide into the architecture's 32 norm groups"):
        load_base(str(path), tokenizer=str(tiny.write_tokenizer(tmp_path / "tok")))
    engine = load_engine(ModelOptions(base=str(path), base_config=str(folder), device="cpu", dtype="fp32"))
    got = engine.pipe.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in base.unet.state_dict().items())
