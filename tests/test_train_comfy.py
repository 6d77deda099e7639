"""Real host (COMFYUI_PATH): single files written with ComfyUI's own classes, the way ComfyUI saves SD1.5 and SDXL
checkpoints, load in the shared loader with outputs equal to ComfyUI's (UNet, text encoders, VAE) and ComfyUI's own
tokenizer files found; the STD trainer trains from the tiny single file, and the LoRA it exports (base + style + STD
delta by default) applies in ComfyUI 0.3.64 with every key matched and reproduces the trained student there."""

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file



def _ids(n=1, length=77, eos=49407):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49000, (n, length), generator=g)
    ids[:, 0], ids[:, 9], ids[:, 10:] = 49406, eos, eos
    return ids


# -- ComfyUI-built single files ------------------------------------------------------------------------------------

SDXL_UNET = dict(in_channels=4, out_channels=4, model_channels=64, context_dim=32 + 48, num_heads=-1,
                 num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                 adm_in_channels=40 + 6 * 8, num_classes="sequential", use_temporal_attention=False,
                 channel_mult=[1, 1, 2], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],  # ComfyUI pops these from the end
                 transformer_depth_middle=2, image_size=32)
CLIP_L = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 1, "intermediate_size": 64,
          "hidden_act": "quick_gelu", "max_position_embeddings": 77, "eos_token_id": 49407}
CLIP_G = {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 1, "intermediate_size": 96,
          "hidden_act": "gelu", "max_position_embeddings": 77, "eos_token_id": 49407}
VAE = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
       "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if norm_weight else 0.0))


@pytest.fixture(scope="module")
def comfy_sdxl(host, tmp_path_factory):
    """A tiny SDXL-shaped checkpoint from ComfyUI's UNetModel, CLIP text models and AutoencoderKL, saved with
    ComfyUI's SDXL key conversion (OpenCLIP layout for the second text tower)."""
    import comfy.clip_model
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    with torch.device("cpu"):
        unet = UNetModel(**SDXL_UNET, operations=ops)
        clip_l = comfy.clip_model.CLIPTextModel(CLIP_L, torch.float32, "cpu", ops)
        clip_g = comfy.clip_model.CLIPTextModel(dict(CLIP_G), torch.float32, "cpu", ops)
        clip_g.text_projection = ops.Linear(48, 40, bias=False)
        vae = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    for i, m in enumerate((unet, clip_l, clip_g, vae)):
        _randomise(m, i)
    clip = {f"clip_l.transformer.{k}": v for k, v in clip_l.state_dict().items()}
    clip.update({f"clip_g.transformer.{k}": v for k, v in clip_g.state_dict().items()})
    clip["clip_g.logit_scale"] = torch.tensor(4.6)
    target = comfy.supported_models.SDXL({})
    sd = target.process_clip_state_dict_for_saving(clip)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    path = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl_comfy.safetensors"
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()},
              str(path))
    for m in (unet, clip_l, clip_g, vae):
        m.half().float()  # the modules as the fp16 file holds them
    return path, {"unet": unet, "clip_l": clip_l, "clip_g": clip_g, "vae": vae}


def test_a_comfyui_sdxl_file_loads_with_comfyuis_outputs_and_tokenizer(host, comfy_sdxl, monkeypatch, tmp_path):
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    from std_hf.base import load_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    path, ref = comfy_sdxl
    base = load_base(str(path))
    assert base.arch == "sdxl" and all(r.ok for r in base.reports)
    assert base.extra["tokenizer"].endswith("comfy/sd1_tokenizer")  # ComfyUI's own files, through COMFYUI_PATH
    assert base.tokenizers[0]("a photo").input_ids == [49406, 320, 1125, 49407]
    ids = _ids()
    with torch.no_grad():
        l_x, _, _, _ = ref["clip_l"](ids)
        g_x, _, g_pooled, _ = ref["clip_g"](ids)
        out_l = base.text_encoders[0](ids)
        out_g = base.text_encoders[1](ids)
    assert torch.allclose(out_l.last_hidden_state, l_x, atol=1e-4)
    assert torch.allclose(out_g.last_hidden_state, g_x, atol=1e-4)
    assert torch.allclose(out_g.text_embeds, g_pooled, atol=1e-4)  # OpenCLIP projection, transposed right
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 77, 80)
    pooled, sizes = torch.randn(1, 40), torch.tensor([64., 64, 0, 0, 64, 64])
    y = torch.cat([pooled, Timestep(8)(sizes).reshape(1, -1)], dim=1)
    with torch.no_grad():
        want = ref["unet"](x, timesteps=t, context=ctx, y=y)
        got = base.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes[None]}).sample
        z = torch.randn(1, 4, 8, 8)
        img_ref = ref["vae"].decode(z)
        img = base.vae.decode(z).sample
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(img, img_ref, atol=1e-4)


def test_the_comfyui_sd15_file_loads_with_comfyuis_outputs(host, tiny_ckpt, tiny_models):
    from std_hf.base import load_base

    model, clip, _ = tiny_models
    base = load_base(str(host.base / "models" / "checkpoints" / tiny_ckpt))
    assert base.arch == "sd15" and all(r.ok for r in base.reports)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
    diffusion = model.model.diffusion_model
    dtype = next(diffusion.parameters()).dtype
    with torch.no_grad():
        want = diffusion(x.to(dtype), timesteps=t, context=ctx.to(dtype)).float()
        got = base.unet(x, t, ctx).sample
        ids = _ids()
        transformer = clip.cond_stage_model.clip_l.transformer
        ref_x = transformer(ids)[0].float()
        out = base.text_encoders[0](ids).last_hidden_state
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3)
    assert torch.allclose(out, ref_x, atol=2e-3, rtol=1e-3)


# -- the trainer from the single file, and its export in ComfyUI ---------------------------------------------------

def _style_lora(path):
    """A kohya SD1.5 style LoRA for the tiny ComfyUI checkpoint: two UNet layers and one text-encoder layer."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, (o, i) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                         "lora_unet_up_blocks_1_attentions_0_proj_out": (320, 320),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(2, i, generator=g) * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def trained_from_single_file(host, tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    out = tmp_path_factory.mktemp("out")
    style = _style_lora(tmp_path_factory.mktemp("style") / "tiny_style.safetensors")
    ckpt = host.base / "models" / "checkpoints" / tiny_ckpt
    from training.common.config import config_from_argv
    from training.common.trainer import Trainer
    from training.std.method import PRESETS, STDConfig, STDMethod

    # no --tokenizer: the CLIP tokenizer files come from the ComfyUI install (COMFYUI_PATH)
    cfg = config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--base", str(ckpt), "--data", str(d),
                                                "--output", str(out), "--max-steps", "2", "--checkpoint-every", "0",
                                                "--num-previews", "0", "--name", "tiny_std", "--style-lora",
                                                str(style)])
    trainer = Trainer(cfg, STDMethod)
    trainer.run()
    return out, trainer


def _load_in_comfy(host, tiny_models, src, caplog, clip_strength=1.0):
    name = f"trained_{src.name}"
    shutil.copy(src, host.base / "models" / "loras" / name)
    model, clip, _ = tiny_models
    with caplog.at_level(logging.WARNING):
        patched, patched_clip = host.M["LoraLoader"]().load_lora(model, clip, name, 1.0, clip_strength)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    return name, patched, patched_clip


def test_the_exported_lora_applies_in_comfyui_with_every_key_and_reproduces_the_student(
        host, tiny_models, trained_from_single_file, caplog):
    out, trainer = trained_from_single_file
    src = out / "tiny_std.safetensors"
    with safe_open(str(src), "pt") as f:
        keys = list(f.keys())
        assert '"base + style + STD delta"' == f.metadata()["std.contains"]
    unet_modules = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    text_modules = {k.split(".")[0] for k in keys if k.startswith("lora_te")}
    assert text_modules == {"lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    name, patched, patched_clip = _load_in_comfy(host, tiny_models, src, caplog)
    assert len(patched.patches) == len(unet_modules) > 50  # every module of the file became a weight patch
    assert len(patched_clip.patcher.patches) == len(text_modules)
    node = host.M["STDLoraLoader"].execute(tiny_models[0], name, 1.0)
    assert node.result[1] == 0.75 and f"{len(unet_modules)}/{len(unet_modules)} layers applied" in node.ui["text"][0]
    import comfy.model_management as mm

    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([600]), torch.randn(1, 77, 768) * 0.5
    model = tiny_models[0]

    def comfy_unet(patcher):  # as ComfyUI's samplers do: load the patcher (weights patched), call the UNet
        mm.load_models_gpu([patcher], force_full_load=True)
        diffusion = patcher.model.diffusion_model
        dtype = next(diffusion.parameters()).dtype
        with torch.no_grad():
            return diffusion(x.to(dtype), timesteps=t, context=ctx.to(dtype)).float()

    in_comfy = comfy_unet(patched)
    plain = comfy_unet(model)  # and back to the unpatched model for the other tests
    with torch.no_grad():
        student = trainer.method.base.unet(x, t, encoder_hidden_states=ctx).sample
    scale = student.abs().mean()
    assert (plain - student).abs().mean() > 10 * (in_comfy - student).abs().mean()
    assert torch.allclose(in_comfy, student, atol=5e-3 * float(scale) + 1e-4, rtol=1e-2)


def test_sid_lsg_generator_from_the_single_file_runs_as_a_one_step_workflow(host, tiny_ckpt, tiny_models,
                                                                             tmp_path, caplog):
    import json

    from tools import comfy_host
    from training.sid_lsg.__main__ import main as sid_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na lighthouse\n")
    ckpt = host.base / "models" / "checkpoints" / tiny_ckpt
    assert sid_cli(["--preset", "tiny", "--base", str(ckpt), "--prompts", str(prompts), "--output",
                    str(tmp_path / "out"), "--max-steps", "1", "--checkpoint-every", "0", "--num-previews", "0",
                    "--name", "tiny_sid"]) == 0
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
