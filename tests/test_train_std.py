"""The STD trainer on tiny random models (CPU): trains from a folder, exports LoRAs that reproduce the student in
diffusers, resumes exactly, keeps the bank, runs on two processes, and refuses bad input clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.common.config import config_from_argv
from training.common.trainer import NaNLossError, Trainer, checkpoints
from training.std.__main__ import main as cli
from training.std.method import PRESETS, STDConfig, STDMethod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (72 + 8 * i, 80, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    (d / "img0.txt").write_text("a red house")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


def _cfg(data, out, **kw):
    return config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--data", str(data), "--output", str(out)], **kw)


def _losses(history):
    return [h["loss/student"] for h in history]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(_cfg(data, out, max_steps=4, checkpoint_every=2, preview_every=4), STDMethod)
    history = trainer.run()
    return trainer, history, out


def test_tiny_preset_trains_and_exports_with_metadata(trained):
    trainer, history, out = trained
    assert len(history) == 4 and all(np.isfinite(_losses(history)))
    kohya = out / "std_sd15_tiny_eta0.75.safetensors"
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["std.start_strength"]) == 0.75 and json.loads(meta["std.start_index"]) == 38
    assert json.loads(meta["std.rr"]) == 0.5 and meta["std.method"] == '"std"' and json.loads(meta["std.steps"]) == 4
    assert all(k.startswith("lora_unet_") for k in keys)
    assert len([k for k in keys if k.endswith(".alpha")]) == len([k for k in keys if k.endswith(".lora_down.weight")])
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "previews" / "step-000004.png").exists() and list((out / "logs").iterdir())
    assert trainer.method.bank.stats["added"] >= 1


def test_exported_peft_lora_reproduces_the_student_in_diffusers(trained):
    trainer, _, out = trained
    from training.common.models import build_tiny

    fresh = build_tiny(seed=123).unet
    student = trainer.method.base.unet
    base_sd = {k: v for k, v in student.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in base_sd.items()})
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = fresh(x, t, encoder_hidden_states=ctx).sample
        fresh.load_lora_adapter(str(out / "std_sd15_tiny_eta0.75_diffusers.safetensors"), prefix="unet",
                                adapter_name="std")
        after = fresh(x, t, encoder_hidden_states=ctx).sample
        expected = student(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=2e-3)  # the export is fp16


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path, trained):
    _, full, _ = trained
    cfg = _cfg(data, tmp_path, max_steps=4, checkpoint_every=0, preview_every=0)
    first = Trainer(cfg, STDMethod)
    original = STDMethod.after_optimizer_step

    def stop_after_two(self):
        if self.trainer.step == 1:
            self.trainer.request_stop()
    STDMethod.after_optimizer_step = stop_after_two
    try:
        part = first.run()
    finally:
        STDMethod.after_optimizer_step = original
    assert first.interrupted and len(part) == 2
    saved = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "bank" / "rank0" / "bank.json").read_text())
    cfg.resume = "latest"
    second = Trainer(cfg, STDMethod)
    rest = second.run()
    assert [len(e) for e in (saved["entries"],)] and second.step == 4
    assert _losses(rest) == _losses(full)  # bit-identical loss sequence, steps 1-4
    assert not list(tmp_path.glob("checkpoints/.checkpoint-*"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    import training.std.method as m

    cfg = _cfg(data, tmp_path, max_steps=4, checkpoint_every=1)
    calls = {"n": 0}
    real = m.pseudo_huber

    def poisoned(a, b, c=1e-3):
        calls["n"] += 1
        return real(a, b, c) * (float("nan") if calls["n"] == 3 else 1.0)
    monkeypatch.setattr(m, "pseudo_huber", poisoned)
    trainer = Trainer(cfg, STDMethod)
    with pytest.raises(NaNLossError, match=r"became nan at step 2.*checkpoint-2"):
        trainer.run()
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")][-1] == "checkpoint-2"
    assert load_file(str(tmp_path / "checkpoints" / "checkpoint-2" / "trainable.safetensors"))


def test_style_lora_is_merged_into_the_teacher_and_a_foreign_one_is_refused(data, tmp_path):
    from training.common.models import build_tiny, merge_lora

    unet = build_tiny().unet
    w = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    lora = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 32),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(32, 2),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0)}
    save_file(lora, str(tmp_path / "style.safetensors"))
    assert merge_lora(unet, str(tmp_path / "style.safetensors"), 0.5) == 1
    assert torch.allclose(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight, w + 0.5)
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(320, 2)},
              str(tmp_path / "sdxl_style.safetensors"))
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), "--style-lora",
                str(tmp_path / "sdxl_style.safetensors")]) == 2


@pytest.mark.parametrize("args, message", [
    (["--data", "{empty}"], "no readable images"),
    (["--data", "{missing}"], "is not a folder"),
    (["--base", "{missing}/model.safetensors"], "does not exist"),
    (["--base", "{corrupt}"], "not a readable safetensors"),
    (["--start-strength", "0.02"], "start_strength"),
    (["--start-strength", "1.5"], "start_strength: got 1.5"),
    (["--range-rate", "0"], "range_rate"),
    (["--w-min", "9", "--w-max", "3"], "w_max"),
    (["--resolution", "60"], "multiple of 8"),
    (["--max-steps", "abc"], "--max-steps"),
    (["--gradient-checkpointing", "maybe"], "true/false"),
    (["--resume", "latest"], "no checkpoint"),
    (["--config", "{missing}/cfg.toml"], "does not exist"),
])
def test_cli_bad_input_gives_a_clear_error(data, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    subst = {"{empty}": str(tmp_path / "empty"), "{missing}": str(tmp_path / "nope"),
             "{corrupt}": str(tmp_path / "corrupt.safetensors")}
    args = [subst.get(a, a.replace("{missing}", str(tmp_path / "nope"))) for a in args]
    base = ["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "out")]
    assert cli(base + args) == 2
    assert message in capsys.readouterr().err


def test_disk_full_for_the_bank_stops_with_a_message(data, tmp_path, monkeypatch, capsys):
    import shutil as _shutil

    import training.std.bank as bank

    monkeypatch.setattr(bank.shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10, 10, 10))
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "free disk space" in capsys.readouterr().err


def test_config_file_and_help(data, tmp_path):
    (tmp_path / "c.toml").write_text(f'data = "{data}"\nmax_steps = 2\nstyle_prompt = "ink wash"\n')
    cfg = config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--config", str(tmp_path / "c.toml"),
                                                "--max-steps", "3"])
    assert (cfg.max_steps, cfg.style_prompt, cfg.base) == (3, "ink wash", "tiny")
    help_text = subprocess.run([sys.executable, "-m", "training.std", "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
    for name in ("--start-strength", "--range-rate", "--rho", "--bank-size", "--style-lora", "--resume",
                 "sd15-8gb", "sdxl-12gb", "sdxl-24gb", "tiny"):
        assert name in help_text


def test_two_processes_train_distinct_data_with_synchronised_gradients(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "training.std", "--preset", "tiny", "--data", str(data), "--output", str(tmp_path),
           "--max-steps", "3", "--checkpoint-every", "0", "--preview-every", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = checkpoints(tmp_path / "checkpoints")[-1]
    r0, r1 = (json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["trainable_sha256"] == r1["trainable_sha256"]  # gradients were all-reduced: replicas identical
    d0, d1 = (json.loads((ckpt / f"data-rank{r}.json").read_text())["items"] for r in (0, 1))
    assert len(d0) == len(d1) == 3 and d0 != d1
    assert (ckpt / "bank" / "rank0" / "bank.json").exists() and (ckpt / "bank" / "rank1" / "bank.json").exists()


def test_offline_bank_build_is_resumable_exact_and_trains(tmp_path):
    from training.bank import OfflineTrajectories, main as bank_cli
    from training.std.trajectory import cfg_lcm, jump, x0_eps

    data = tmp_path / "data"  # two images and η 0.3 (15 teacher steps each) keep this quick
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 * i, dtype=np.uint8)).save(data / f"{i}.png")
    common = ["--preset", "tiny", "--data", str(data), "--output", str(tmp_path), "--bank-dir",
              str(tmp_path / "traj"), "--start-strength", "0.3"]
    assert bank_cli(["build", *common]) == 0
    shards = sorted((tmp_path / "traj").glob("traj-*.safetensors"))
    assert len(shards) == 2
    stamp = [p.stat().st_mtime_ns for p in shards]
    assert bank_cli(["build", *common]) == 0  # resumable: nothing is recomputed
    assert [p.stat().st_mtime_ns for p in shards] == stamp
    with safe_open(str(shards[0]), "pt") as f:
        names = set(f.keys())
    assert {f"state_{n}" for n in range(1, 16)} <= names and "z0" in names and "prompt_embeds" in names
    # each stored step is the teacher's CFG'd DDIM step from the previous state (fp16 storage)
    trainer = Trainer(_cfg(data, tmp_path / "check", start_strength=0.3), STDMethod)
    m = trainer.method
    m.setup()
    p = OfflineTrajectories(tmp_path / "traj").pair(0, 9, "cpu")
    x, n = p["x"][None], torch.tensor([9])
    ctx = {k: v[None] for k, v in p["ctx"].items()}
    with torch.no_grad(), m.teacher():
        cond = x0_eps(m.unet(x, n, ctx), x, m.grid.alpha(n))
        unc = x0_eps(m.unet(x, n, m.uncond(1)), x, m.grid.alpha(n))
    x0_t, eps_t = cfg_lcm(cond, unc, torch.tensor([p["w"]]))
    assert torch.allclose(jump(x0_t, eps_t, m.grid.alpha_prev(n))[0], p["x_prev"], atol=2e-2, rtol=1e-2)
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "train"), "--bank-source",
                str(tmp_path / "traj"), "--max-steps", "2", "--num-previews", "0", "--start-strength", "0.3"]) == 0
    assert bank_cli(["oops"]) == 2


def test_video_mode_trains_clips_with_a_motion_module(tmp_path):
    from comfyui_std.core.video import save_video

    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        save_video(torch.rand(10, 48, 64, 3, generator=torch.Generator().manual_seed(i)), data / f"c{i}.mp4", 8)
    (data / "still.png").write_bytes(b"")  # images are not clips: ignored in video mode
    out = tmp_path / "out"
    assert cli(["--preset", "tiny-video", "--data", str(data), "--output", str(out), "--max-steps", "2",
                "--adversarial", "true"]) == 0  # with the per-frame discriminator and a clip preview
    assert list((out / "previews").glob("*.png"))
    files = {p.name for p in out.glob("*.safetensors")}
    assert files == {"std_sd15_tiny_eta0.75.safetensors", "std_sd15_tiny_eta0.75_diffusers.safetensors",
                     "std_sd15_tiny_eta0.75_motion.safetensors"}
    with safe_open(str(out / "std_sd15_tiny_eta0.75_motion.safetensors"), "pt") as f:
        motion = list(f.keys())
    with safe_open(str(out / "std_sd15_tiny_eta0.75.safetensors"), "pt") as f:
        image = list(f.keys())
    assert motion and all("motion_modules" in k for k in motion)
    assert image and not any("motion" in k for k in image)
    bank = json.loads((checkpoints(out / "checkpoints")[-1] / "bank" / "rank0" / "bank.json").read_text())
    entry = bank["entries"][0]
    with safe_open(str(checkpoints(out / "checkpoints")[-1] / "bank" / "rank0" / entry["file"]), "pt") as f:
        assert f.get_slice("state").get_shape() == [4, 3, 32, 32]  # one noise level for the whole 3-frame clip
    assert cli(["--preset", "tiny-video", "--data", str(data), "--output", str(out / "x"), "--motion-adapter",
                ""]) == 2


def test_ema_target_is_an_option_and_checkpointed(data, tmp_path):
    trainer = Trainer(_cfg(data, tmp_path, max_steps=2, ema_target=True, ema_decay=0.5, num_previews=0),
                      STDMethod)
    trainer.run()
    sd = load_file(str(checkpoints(tmp_path / "checkpoints")[-1] / "trainable.safetensors"))
    ema = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
    online = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    assert ema.keys() == online.keys() and ema
    assert any(not torch.equal(ema[k], online[k]) for k in ema)


def _tiny_ip_files(tmp_path, cross_dim=32):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from training.common.models import build_tiny

    unet = build_tiny().unet
    n_layers = len([n for n in unet.attn_processors if n.endswith("attn2.processor")])
    g = torch.Generator().manual_seed(0)
    sd = {"image_proj.proj.weight": torch.randn(4 * cross_dim, 16, generator=g) * 0.3,
          "image_proj.proj.bias": torch.zeros(4 * cross_dim), "image_proj.norm.weight": torch.ones(cross_dim),
          "image_proj.norm.bias": torch.zeros(cross_dim)}
    for k in range(n_layers):
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = torch.randn(32, cross_dim, generator=g) * 0.3
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = torch.randn(32, cross_dim, generator=g) * 0.3
    save_file(sd, str(tmp_path / f"ip_{cross_dim}.safetensors"))
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=16,
                                                         projection_dim=16))
    enc.save_pretrained(tmp_path / "encoder")
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    return tmp_path / f"ip_{cross_dim}.safetensors", tmp_path / "encoder", tmp_path / "s.png"


def test_style_image_conditions_only_the_teacher_on_the_style_blocks(data, tmp_path):
    from comfyui_std.core.style_blocks import selects, target_blocks

    ip, enc, img = _tiny_ip_files(tmp_path)
    cfg = _cfg(data, tmp_path / "o", max_steps=2, num_previews=0, style_image=str(img), ip_adapter=str(ip),
               image_encoder=str(enc))
    trainer = Trainer(cfg, STDMethod)
    m = trainer.method
    m.setup()
    on = {k[: -len(".processor")] for k, v in m.style_ref.preset_scales.items() if v}
    assert on and all(selects(k, target_blocks("style", "sd15")) for k in on)
    x, n = torch.randn(1, 4, 32, 32), torch.tensor([30])
    ctx = {k: v[None] for k, v in m.text_context("a house").items()}
    with torch.no_grad():
        with m.teacher():
            styled = m.unet(x, n, ctx)
            m.style_ref.set_scales(False)
            plain = m.unet(x, n, ctx)
        student = m.unet(x, n, ctx)
        m.style_ref.embeds = torch.randn_like(m.style_ref.embeds)
        student_other_image = m.unet(x, n, ctx)
    assert not torch.allclose(styled, plain)
    assert torch.equal(student, student_other_image)  # the student never sees the image
    assert trainer.run() and (tmp_path / "o" / "std_sd15_tiny_eta0.75.safetensors").exists()
    ip_sdxl, _, _ = _tiny_ip_files(tmp_path, cross_dim=2048)
    base = ["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "p"), "--style-image", str(img)]
    assert cli(base + ["--ip-adapter", str(ip_sdxl), "--image-encoder", str(enc)]) == 2
    assert cli(base + ["--ip-adapter", str(ip), "--image-encoder", str(tmp_path / "nope")]) == 2
    assert cli(base) == 2
