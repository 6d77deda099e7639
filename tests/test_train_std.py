"""The STD trainer on tiny random models (CPU): trains from a folder, exports LoRAs that reproduce the student in
diffusers (with the style carried or named), keeps a reproducible bank, runs on two processes, offline trajectories,
video, buckets, caches, precision, and refuses bad input clearly."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import REPO, image_folder, same_tensors, stop_a_training_run, stop_at, tensors

from training.common.config import config_from_argv
from training.common.trainer import NaNLossError, Trainer, checkpoints
from training.std.__main__ import main as cli
from training.std.method import PRESETS, STDConfig, STDMethod

NAME = "std_sd15_tiny_eta0.75"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = image_folder(tmp_path_factory.mktemp("data"))
    (d / "img0.txt").write_text("a red house")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


def _cfg(data, out, *args, **kw):
    return config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--data", str(data), "--output", str(out),
                                                 *args], **kw)


def _losses(history, key="loss/student"):
    return [h[key] for h in history]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    old = os.umask(0o077)  # a strict umask must not make the exports unreadable for others
    try:
        trainer = Trainer(_cfg(data, out, max_steps=4, checkpoint_every=2, preview_every=2), STDMethod)
        history = trainer.run()
    finally:
        os.umask(old)
    return trainer, history, out


def test_tiny_preset_trains_and_exports_with_metadata(trained):
    trainer, history, out = trained
    assert len(history) == 4 and all(np.isfinite(_losses(history)))
    kohya = out / f"{NAME}.safetensors"
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["std.start_strength"]) == 0.75 and json.loads(meta["std.start_index"]) == 38
    assert json.loads(meta["std.rr"]) == 0.5 and meta["std.method"] == '"std"' and json.loads(meta["std.steps"]) == 4
    assert json.loads(meta["std.s_window"]) == "official" and json.loads(meta["std.contains"]) == "STD delta"
    assert all(k.startswith("lora_unet_") for k in keys)
    assert len([k for k in keys if k.endswith(".alpha")]) == len([k for k in keys if k.endswith(".lora_down.weight")])
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert {p.name for p in (out / "previews").iterdir()} == {"step-000002.png", "step-000004.png"}
    assert list((out / "logs").iterdir())
    for f in (kohya, out / f"{NAME}_diffusers.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "std" and config["options"]["start_strength"] == 0.75
    assert json.loads((out / "checkpoints" / "checkpoint-4" / "config.json").read_text())["options"] == \
        config["options"]
    log = (out / "train.log").read_text()
    assert "previews: img4.png held out of training" in log and "step 4/6" not in log and "exported" in log
    assert trainer.method.bank.stats["added"] >= 1
    assert "img4.png" not in {i.path.name for i in trainer.method.items}  # held out for the previews
    files = {p.suffix for p in (out / "checkpoints" / "checkpoint-4").rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json"}  # no pickles


def _fresh_unet():
    from std_hf.tiny import tiny_components

    return tiny_components("sd15", seed=0)["unet"]


def test_exported_peft_lora_reproduces_the_student_in_diffusers(trained):
    trainer, _, out = trained
    fresh = _fresh_unet()
    student = trainer.method.base.unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = fresh(x, t, encoder_hidden_states=ctx).sample
        fresh.load_lora_adapter(str(out / f"{NAME}_diffusers.safetensors"), prefix="unet", adapter_name="std")
        after = fresh(x, t, encoder_hidden_states=ctx).sample
        expected = student(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=2e-3)  # the export is fp16


# -- reproducibility -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trajectories(data, tmp_path_factory):
    from training.bank import main as bank_cli

    folder = tmp_path_factory.mktemp("traj")
    assert bank_cli(["build", "--preset", "tiny", "--data", str(data), "--output", str(folder / "o"), "--bank-dir",
                     str(folder / "t"), "--start-strength", "0.3", "--draws", "2"]) == 0
    return folder / "t"


MODES = {"online bank": [], "adversarial": ["--adversarial", "true"], "2 data workers": ["--num-workers", "2"],
         "offline bank": ["--start-strength", "0.3", "--bank-source", "{traj}"]}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_fresh_runs_match_and_a_resumed_run_matches_the_uninterrupted_one(data, tmp_path, mode, request):
    args = [request.getfixturevalue("trajectories").as_posix() if a == "{traj}" else a for a in MODES[mode]]
    common = ["--max-steps", "4", "--checkpoint-every", "0", "--num-previews", "0", *args]
    a = Trainer(_cfg(data, tmp_path / "a", *common), STDMethod)
    full = a.run()
    b = Trainer(_cfg(data, tmp_path / "b", *common), STDMethod)
    again = b.run()
    assert _losses(full) == _losses(again)
    name = a.method.export_name()
    for suffix in ("", "_diffusers"):
        assert same_tensors(tensors(tmp_path / "a" / f"{name}{suffix}.safetensors"),
                            tensors(tmp_path / "b" / f"{name}{suffix}.safetensors"))
    with stop_at(STDMethod, 2):
        first = Trainer(_cfg(data, tmp_path / "c", *common), STDMethod)
        part = first.run()
    assert first.interrupted and len(part) == 2 and not (tmp_path / "c" / f"{name}.safetensors").exists()
    rest = Trainer(_cfg(data, tmp_path / "c", *common, "--resume", "latest"), STDMethod).run()
    assert _losses(rest) == _losses(full)  # bit-identical, steps 1-4
    if mode == "adversarial":
        assert _losses(rest, "loss/discriminator") == _losses(full, "loss/discriminator")
    assert same_tensors(tensors(tmp_path / "a" / f"{name}.safetensors"),
                        tensors(tmp_path / "c" / f"{name}.safetensors"))
    assert not list(tmp_path.glob("*/checkpoints/.checkpoint-*"))


def test_data_workers_decode_in_other_processes_and_change_nothing(data, tmp_path, monkeypatch):
    """Bug caught: crops drawn from the step's shared generator (then the worker count changes what is trained), or
    workers that are never used (the pixels all decoded in the training process)."""
    import training.common.data as d

    log = tmp_path / "pids.txt"
    real = d.load_pixels

    def logged(*a, **k):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **k)

    monkeypatch.setattr(d, "load_pixels", logged)
    common = ["--max-steps", "4", "--checkpoint-every", "0", "--num-previews", "0", "--batch-size", "2"]
    runs = {}
    for workers in (0, 2):
        log.write_text("")
        t = Trainer(_cfg(data, tmp_path / f"w{workers}", *common, "--num-workers", str(workers)), STDMethod)
        runs[workers] = _losses(t.run())
        pids = set(log.read_text().split())
        assert pids and (str(os.getpid()) in pids) == (workers == 0), pids
        assert len(pids) == (1 if workers == 0 else 2)
    assert runs[0] == runs[2]
    name = t.method.export_name()
    assert same_tensors(tensors(tmp_path / "w0" / f"{name}.safetensors"),
                        tensors(tmp_path / "w2" / f"{name}.safetensors"))


def test_video_clips_through_data_workers_equal_the_in_process_ones(tmp_path):
    from comfyui_std.core.video import save_video

    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(2):
        save_video(torch.rand(10, 48, 64, 3, generator=torch.Generator().manual_seed(i)), clips / f"c{i}.mp4", 8)
    for workers in (0, 2):
        assert cli(["--preset", "tiny-video", "--data", str(clips), "--output", str(tmp_path / f"w{workers}"),
                    "--max-steps", "2", "--num-previews", "0", "--num-workers", str(workers)]) == 0
    for suffix in ("", "_motion"):
        assert same_tensors(tensors(tmp_path / "w0" / f"{NAME}{suffix}.safetensors"),
                            tensors(tmp_path / "w2" / f"{NAME}{suffix}.safetensors"))


def test_time_phases_logs_every_phase_of_a_step_and_changes_nothing(data, tmp_path):
    """Bug caught: a phase left untimed (its figure missing from the GPU check) or a timer that alters the run."""
    common = ["--max-steps", "3", "--checkpoint-every", "0", "--num-previews", "0", "--adversarial", "true"]
    timed = Trainer(_cfg(data, tmp_path / "t", *common, "--time-phases", "true"), STDMethod).run()
    plain = Trainer(_cfg(data, tmp_path / "p", *common), STDMethod).run()
    assert _losses(timed) == _losses(plain)
    assert not any(k.startswith("time/") for h in plain for k in h)
    phases = {k for h in timed for k in h if k.startswith("time/")}
    assert phases == {f"time/{p}_s" for p in ("step", "data", "vae", "text", "teacher", "target", "student", "backward",
                                               "discriminator", "bank", "optimizer")}, phases
    assert all(h[k] >= 0 for h in timed for k in h if k.startswith("time/"))
    first = timed[0]  # the bank is empty at step 1: every sample starts fresh (data, vae, text, teacher)
    assert first["time/data_s"] > 0 and first["time/teacher_s"] > 0


def test_bank_keys_are_counters_and_a_batch_never_draws_an_entry_twice(tmp_path):
    from training.std.trajectory_bank import TrajectoryBank

    a, b = (TrajectoryBank(tmp_path / k, capacity=3, rho=1.0, seed=5) for k in "ab")
    for bank in (a, b):
        for i in range(3):
            bank.put(20, torch.full((2,), float(i)), {}, meta={"group": (64, 64)})
    assert sorted(a.entries) == sorted(b.entries) == ["e000000001", "e000000002", "e000000003"]
    for _ in range(50):
        drawn = a.draw_batch(5, (64, 64))
        keys = [e.key for e in drawn if e is not None]
        assert len(keys) == len(set(keys)) == 3 and drawn[3:] == [None, None]
        assert [e.key for e in drawn[:3]] == [e.key for e in b.draw_batch(5, (64, 64))[:3]]
    assert a.draw_batch(2, (56, 72)) == [None, None]  # another bucket: no entry fits


@pytest.mark.bad_input
def test_a_resume_with_other_method_options_is_refused_naming_them(trained, capsys, data):
    _, _, out = trained
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(out), "--resume", "latest",
                "--start-strength", "0.85", "--rho", "0.5", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 was trained with other settings" in err
    assert "start_strength 0.75 -> 0.85" in err and "rho 0.8 -> 0.5" in err and "max_steps" not in err


def test_a_resume_may_change_free_options(trained, data, tmp_path):
    import shutil

    _, full, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    cfg = _cfg(data, copy, "--resume", "latest", "--max-steps", "5", "--log-every", "1", "--num-previews", "0",
               checkpoint_every=2, preview_every=2)
    history = Trainer(cfg, STDMethod).run()
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5] and _losses(history)[:4] == _losses(full)


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint could do."""
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.bad_input
def test_a_checkpoint_carrying_a_pickle_is_refused_and_never_unpickled(trained, tmp_path, capsys, data):
    import pickle
    import shutil

    _, _, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    marker = tmp_path / "pwned"
    Payload.marker = marker
    (copy / "checkpoints" / "checkpoint-4" / "optimizers.pt").write_bytes(pickle.dumps(Payload()))
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(copy), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "optimizers.pt, a pickle" in err and "never loads one" in err
    assert not marker.exists()


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted at step"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM) at step")])
def test_a_stop_signal_writes_a_checkpoint_and_exits_with_the_resume_command(data, tmp_path, signum, code, said):
    """Ctrl-C and SIGTERM (a scheduler, systemd, docker stop) end the STD trainer the same way: the step finishes, a
    checkpoint is written and the resume command printed; exit 130 / 143. Bug caught: SIGTERM killed the run with
    no checkpoint (it had no handler)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.std", "--preset", "tiny", "--data", str(data), "--output", str(out),
           "--max-steps", "100000", "--checkpoint-every", "0", "--num-previews", "0", "--log-every", "1"]
    returncode, err = stop_a_training_run(cmd, out, signum)
    assert returncode == code, err[-2000:]
    assert "Traceback" not in err and said in err
    ckpt = checkpoints(out / "checkpoints")
    assert len(ckpt) == 1 and int(ckpt[0].name.split("-")[1]) >= 1
    assert "--resume latest" in err and f"--output {out}" in err
    assert not list((out / "checkpoints").glob(".*")), "a temporary checkpoint folder was left behind"


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_to_the_whole_process_group_with_data_workers(data, tmp_path, signum, code):
    """systemd, Slurm and a terminal signal every process of the run, the DataLoader workers too. A worker killed
    by that SIGTERM made the next batch fail with "DataLoader worker exited unexpectedly": a traceback, exit 1, no
    checkpoint. The workers leave the first stop signal to the trainer, which checkpoints and shuts them down."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.std", "--preset", "tiny", "--data", str(data), "--output", str(out),
           "--max-steps", "100000", "--checkpoint-every", "0", "--num-previews", "0", "--log-every", "1",
           "--num-workers", "2"]
    returncode, err = stop_a_training_run(cmd, out, signum, group=True)
    assert returncode == code, err[-3000:]
    assert "Traceback" not in err and "--resume latest" in err
    assert len(checkpoints(out / "checkpoints")) == 1


def test_sigterm_before_training_starts_exits_143_without_a_traceback(data, tmp_path):
    """SIGTERM while the run is still loading (no training loop yet): exit 143, one line, no traceback."""
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = ("import os, signal, sys, time\nimport training.common.cli as c\n"
            "sys.exit(c.guarded(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30))))\n")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "terminated (SIGTERM)", proc.stderr[-2000:]
    assert time.time() - start < 30


def test_a_stop_signal_during_the_checkpoint_swap_waits_until_the_swap_is_done(tmp_path):
    """SIGINT/SIGTERM inside held_signals is raised again after the block, for the handler in place (torch's
    threads make masking useless: the signal must be caught and replayed)."""
    import training.common.trainer as tr

    order = []
    previous = signal.signal(signal.SIGTERM, lambda *_: order.append("handler"))
    try:
        with tr.held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # give the interpreter every chance to run a handler here
                pass
            order.append("swap done")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert order == ["swap done", "handler"]


def test_a_checkpoint_saved_again_is_never_missing(tmp_path, monkeypatch):
    """Saving step N again (a stop right after a scheduled checkpoint) used to delete checkpoint-N before renaming
    the new one in: a crash or second Ctrl-C in that gap left no checkpoint N. Now the old one is set aside, the new
    one renamed in, the old one deleted; a crash between the renames still leaves a complete checkpoint N."""
    import training.common.trainer as tr

    folder = tmp_path / "checkpoints"

    def complete(path, tag):
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps({"step": 3, "tag": tag}))
        return path

    final = complete(folder / "checkpoint-3", "old")
    tmp = complete(folder / ".checkpoint-3.tmp", "new")
    real = os.replace

    def crash_on_the_second_rename(src, dst):
        if Path(src) == tmp:
            raise OSError("power cut")
        return real(src, dst)

    monkeypatch.setattr(tr.os, "replace", crash_on_the_second_rename)
    with pytest.raises(OSError, match="power cut"):
        tr.install_checkpoint(tmp, final)
    kept = checkpoints(folder)
    assert len(kept) == 1 and json.loads((kept[0] / "state.json").read_text())["tag"] == "old"
    monkeypatch.setattr(tr.os, "replace", real)
    tr.install_checkpoint(tmp, final)
    assert checkpoints(folder) == [final] and json.loads((final / "state.json").read_text())["tag"] == "new"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3"]


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


# -- style LoRAs and the export ------------------------------------------------------------------------------------

def _style_lora(path, ldm_names=False):
    """A kohya style LoRA on two UNet layers (diffusers or LDM names) and two text-encoder layers."""
    g = torch.Generator().manual_seed(7)
    unet_layer = "input_blocks_1_1_transformer_blocks_0_attn1_to_q" if ldm_names else \
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {}
    for name, (o, i) in {f"lora_unet_{unet_layer}": (16, 16),
                         "lora_unet_up_blocks_1_resnets_0_conv1": (32, 64),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
                         "lora_te_text_model_encoder_layers_1_mlp_fc1": (64, 32)}.items():
        conv = "conv1" in name
        sd[f"{name}.lora_down.weight"] = torch.randn(2, i, *((3, 3) if conv else ()), generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 2, *((1, 1) if conv else ()), generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def styled(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("styled")
    style = _style_lora(folder / "my_style.safetensors")
    runs = {}
    for export in ("with_style", "delta"):
        cfg = _cfg(data, folder / export, "--style-lora", str(style), "--style-lora-scale", "0.8", "--export", export,
                   max_steps=2, num_previews=0)
        trainer = Trainer(cfg, STDMethod)
        trainer.run()
        runs[export] = trainer
    return folder, style, runs


def _unet_out(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def test_the_default_export_carries_the_style_and_reproduces_the_student_alone(styled):
    from diffusers import StableDiffusionPipeline

    from std_app.tiny import build_pipeline

    folder, style, runs = styled
    trainer = runs["with_style"]
    name = folder / "with_style" / NAME
    with safe_open(f"{name}.safetensors", "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["std.contains"]) == "base + style + STD delta"
    assert json.loads(meta["std.style_loras"])[0]["file"] == "my_style.safetensors"
    assert any(k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc1") for k in keys)
    down = load_file(f"{name}.safetensors")["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
                                            ".lora_down.weight"]
    assert down.shape[0] == 4 + 2  # the STD rank plus the style LoRA's
    pipe = build_pipeline("sd15")  # the same tiny base, fresh
    assert isinstance(pipe, StableDiffusionPipeline)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([600]), torch.randn(1, 77, 32)
    plain = _unet_out(pipe.unet, x, t, ctx)
    pipe.load_lora_weights(f"{name}_diffusers.safetensors", adapter_name="std")
    student = trainer.method.base.unet
    assert not torch.allclose(plain, _unet_out(student, x, t, ctx), atol=1e-3)
    assert torch.allclose(_unet_out(pipe.unet, x, t, ctx), _unet_out(student, x, t, ctx), atol=3e-3)
    ids = torch.tensor([[512, 72, 105, 513] + [513] * 73])
    with torch.no_grad():
        styled_text = pipe.text_encoder(ids).last_hidden_state
        trained_text = trainer.method.base.text_encoders[0](ids).last_hidden_state
    assert torch.allclose(styled_text, trained_text, atol=3e-3)  # the style's text-encoder layer came along


def test_the_delta_export_names_the_style_lora_and_needs_it(styled):
    from std_app.tiny import build_pipeline
    from training.std.method import file_digest

    folder, style, runs = styled
    name = folder / "delta" / NAME
    with safe_open(f"{name}.safetensors", "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    entry = json.loads(meta["std.style_loras"])[0]
    assert entry == {"file": "my_style.safetensors", "sha256": file_digest(str(style)), "scale": 0.8}
    assert "load the style LoRA" in json.loads(meta["std.contains"]) and not any("lora_te" in k for k in keys)
    pipe = build_pipeline("sd15")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([600]), torch.randn(1, 77, 32)
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.load_lora_weights(f"{name}_diffusers.safetensors", adapter_name="std")
    pipe.set_adapters(["style", "std"], adapter_weights=[0.8, 1.0])
    assert torch.allclose(_unet_out(pipe.unet, x, t, ctx), _unet_out(runs["delta"].method.base.unet, x, t, ctx),
                          atol=3e-3)


def test_style_loras_with_ldm_names_merge_and_foreign_ones_are_refused(data, tmp_path, capsys):
    from std_hf.lora import lora_layers, merge_layers
    from std_hf.tiny import tiny_components

    parts = tiny_components("sd15")
    for ldm_names in (False, True):
        unet = tiny_components("sd15")["unet"]
        path = _style_lora(tmp_path / f"s{ldm_names}.safetensors", ldm_names)
        layers = lora_layers(unet, [parts["text_encoder"]], load_file(str(path)), {}, "style_lora", 0.5)
        assert ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") in layers
        w = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
        merge_layers({"unet": unet, "text_encoder": parts["text_encoder"]}, layers)
        sd = load_file(str(path))
        key = next(k for k in sd if "attn1_to_q.lora_down" in k)
        up = sd[key.replace("lora_down", "lora_up")]
        got = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
        assert torch.allclose(got, w + 0.5 * (1.0 / 2) * (up @ sd[key]), atol=1e-6)  # scale · alpha / rank
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(320, 2)},
              str(tmp_path / "sdxl_style.safetensors"))
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), "--style-lora",
                str(tmp_path / "sdxl_style.safetensors")]) == 2
    assert "does not fit tiny: 1 of 1 layers do not match (e.g. lora_unet_input_blocks_1_1_proj_in gives shape" in \
        capsys.readouterr().err


# -- bad input at the command line ---------------------------------------------------------------------------------

BAD = [
    (["--data", "{empty}"], "no readable images"),
    (["--data", "{missing}"], "is not a folder"),
    (["--base", "{missing}/model.safetensors"], "was not found"),
    (["--base", "{corrupt}"], "not a readable .safetensors"),
    (["--start-strength", "0.02"], "start_strength"),
    (["--start-strength", "1.5"], "start_strength: got 1.5"),
    (["--range-rate", "0"], "range_rate"),
    (["--w-min", "9", "--w-max", "3"], "w_max"),
    (["--resolution", "60"], "multiple of 8"),
    (["--max-steps", "abc"], "--max-steps"),
    (["--max-steps", "-1"], "max_steps: got -1"),
    (["--max-steps", "2.5"], "expected an integer"),
    (["--learning-rate", "nan"], "--learning-rate: expected a finite number"),
    (["--learning-rate", "0"], "learning_rate: got 0.0"),
    (["--lora-rank", "0"], "lora_rank"),
    (["--lora-targets", ","], "lora_targets"),
    (["--batch-size", "0"], "batch_size"),
    (["--seed", "-3"], "seed: got -3"),
    (["--bank-size", "0"], "bank_size"),
    (["--rho", "1.5"], "rho"),
    (["--s-window", "wide"], "--s-window: got 'wide', choose one of official, paper"),
    (["--s-gamma", "1"], "s_gamma"),
    (["--export", "both"], "--export: got 'both'"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--mixed-precision", "fp16"], "fp16 needs a GPU"),
    (["--vae-dtype", "int8"], "--vae-dtype"),
    (["--device", "gpu0"], "device: 'gpu0' is not a device"),
    (["--device", "meta"], "device: 'meta': only cpu, cuda, mps devices are supported"),
    (["--device", "cuda:7"], "device: 'cuda:7'"),  # no GPU here, or fewer than eight
    (["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "device: 'cuda"),
    (["--device", "mps" if not torch.backends.mps.is_available() else "mps:3"], "device: 'mps"),
    (["--preview-nfe", "0"], "nfe"),
    (["--preview-teacher-nfe", "0"], "preview_teacher_nfe"),
    (["--num-frames", "0"], "num_frames"),
    (["--ip-preset", "everything"], "--ip-preset"),
    (["--use-8bit-adam", "true"], "needs bitsandbytes"),
    (["--gradient-checkpointing", "maybe"], "true/false"),
    (["--resume", "latest"], "no checkpoint"),
    (["--resume", "{missing}"], "is not a checkpoint folder"),
    (["--config", "{missing}/cfg.toml"], "does not exist"),
    (["--config", "{badtoml}"], "is not valid TOML"),
    (["--config", "{badyaml}"], "is not valid YAML"),
    (["--config", "{unknown}"], "unknown option(s) stepz"),
    (["--output", "{file}"], "output: "),
    (["--output", "{file}/run"], "cannot write into"),
    (["--output", "{readonly}"], "cannot write into"),
    (["--bank-source", "{empty}"], "holds no trajectories"),
    (["--tokenizer", "{empty}"], "tokenizer: only used with a single-file base"),
    (["--style-lora", "{missing}"], "does not exist"),
    (["--data", "{badcaption}"], "is not UTF-8 text"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_cli_bad_input_gives_a_clear_error(data, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    (tmp_path / "bad.toml").write_text("max_steps = [\n")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    (tmp_path / "unknown.toml").write_text("stepz = 3\n")
    (tmp_path / "file").write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o500)
    if os.geteuid() == 0:  # root writes into read-only folders; /proc takes no new folders from anyone
        readonly = Path("/proc/std-trainer-output")
    captions = image_folder(tmp_path / "captions", 1)
    (captions / "img0.txt").write_bytes(b"\xff\xfe\x00bad")
    subst = {"{empty}": tmp_path / "empty", "{missing}": tmp_path / "nope",
             "{corrupt}": tmp_path / "corrupt.safetensors",
             "{badtoml}": tmp_path / "bad.toml", "{badyaml}": tmp_path / "bad.yaml",
             "{unknown}": tmp_path / "unknown.toml", "{file}": tmp_path / "file", "{readonly}": readonly,
             "{badcaption}": captions}
    for k, v in subst.items():
        args = [a.replace(k, str(v)) for a in args]
    base = ["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "out")]
    try:
        code = cli(base + args)
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_disk_full_for_the_bank_stops_with_a_message(data, tmp_path, monkeypatch, capsys):
    import shutil as _shutil

    import training.std.trajectory_bank as bank

    monkeypatch.setattr(bank.shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10, 10, 10))
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "free disk space" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [KeyError("student"), ValueError("shapes do not broadcast"),
                                 FileNotFoundError(2, "No such file or directory")])
def test_an_internal_error_is_exit_1_with_its_traceback_in_train_log(data, tmp_path, monkeypatch, capsys, bug):
    """A bug is not the user's problem: its traceback goes to stderr and train.log and the last line says so (exit 1),
    where a ValueError or OSError used to become an 'error:' line with exit 2 and no traceback anywhere."""
    def broken(self, micro_step):
        raise bug
        yield  # a generator, like the real micro_step

    monkeypatch.setattr(STDMethod, "micro_step", broken)
    out = tmp_path / "out"
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: internal error ({type(bug).__name__}: ") and "this is a bug" in last
    assert last.endswith(f"(above and in {out / 'train.log'})")
    assert "Traceback (most recent call last)" in err and "in broken" in err
    logged = (out / "train.log").read_text()
    assert "ERROR training: internal error\nTraceback (most recent call last)" in logged and "in broken" in logged


def test_a_full_disk_is_the_users_problem_not_a_bug(data, tmp_path, monkeypatch, capsys):
    def full(self, micro_step):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "bank"))
        yield

    monkeypatch.setattr(STDMethod, "micro_step", full)
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: No space left on device: {tmp_path / 'out' / 'bank'}"
    assert "Traceback" not in err


def test_config_file_run_config_and_help(data, tmp_path, trained):
    (tmp_path / "c.toml").write_text(f'data = "{data}"\nmax_steps = 2\nstyle_prompt = "ink wash"\n')
    cfg = config_from_argv(STDConfig, PRESETS, ["--preset", "tiny", "--config", str(tmp_path / "c.toml"),
                                                "--max-steps", "3"])
    assert (cfg.max_steps, cfg.style_prompt, cfg.base) == (3, "ink wash", "tiny")
    _, _, out = trained
    again = config_from_argv(STDConfig, PRESETS, ["--config", str(out / "config.json")])
    assert again == trained[0].cfg  # a run folder's config.json reproduces the run's options
    help_text = subprocess.run([sys.executable, "-m", "training.std", "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
    for name in ("--start-strength", "--range-rate", "--s-window", "--s-gamma", "--rho", "--bank-size",
                 "--style-lora", "--export", "--resume", "--aspect-buckets", "--cache-latents",
                 "--offload-text-encoders",
                 "sd15-8gb", "sdxl-12gb", "sdxl-24gb", "tiny"):
        assert name in help_text


def test_a_different_run_in_the_output_folder_is_warned_about(trained, data, tmp_path, caplog):
    import logging
    import shutil

    _, _, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with caplog.at_level(logging.WARNING, logger="training"):
        Trainer(_cfg(data, copy, "--start-strength", "0.5", max_steps=1, num_previews=0), STDMethod).run()
    assert "already holds a different run (start_strength 0.75 -> 0.5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training"):
        Trainer(_cfg(data, copy, "--start-strength", "0.5", max_steps=1, num_previews=0), STDMethod).run()
    assert "already holds checkpoints (latest checkpoint-4); this run starts over" in caplog.text


def test_two_processes_train_distinct_data_with_synchronised_gradients(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "training.std", "--preset", "tiny", "--data", str(data), "--output", str(tmp_path),
           "--max-steps", "3", "--checkpoint-every", "0", "--num-previews", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = checkpoints(tmp_path / "checkpoints")[-1]
    r0, r1 = (json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["trainable_sha256"] == r1["trainable_sha256"]  # gradients were all-reduced: replicas identical
    d0, d1 = (json.loads((ckpt / f"data-rank{r}.json").read_text())["items"] for r in (0, 1))
    assert len(d0) == len(d1) == 3 and d0 != d1
    assert (ckpt / "bank" / "rank0" / "bank.json").exists() and (ckpt / "bank" / "rank1" / "bank.json").exists()


def test_offline_bank_build_is_resumable_exact_with_k_draws(data, trajectories, tmp_path, capsys):
    from training.bank import main as bank_cli
    from training.std.offline_bank import OfflineTrajectories
    from comfyui_std.core.vp import x0_eps
    from training.std.trajectory import cfg_lcm, jump

    shards = sorted(trajectories.glob("traj-*.safetensors"))
    assert len(shards) == 2 * 5  # 2 draws for each of the 5 images (none held out for previews)
    stamp = [p.stat().st_mtime_ns for p in shards]
    common = ["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), "--bank-dir",
              str(trajectories), "--start-strength", "0.3", "--draws", "2"]
    assert bank_cli(["build", *common]) == 0  # resumable: nothing is recomputed
    assert [p.stat().st_mtime_ns for p in shards] == stamp
    with safe_open(str(shards[0]), "pt") as f:
        names = set(f.keys())
    assert {f"state_{n}" for n in range(1, 16)} <= names and "z0" in names and "prompt_embeds" in names
    bank = OfflineTrajectories(trajectories)
    p0, p1 = bank.pair("img0.png", 0, 9, "cpu"), bank.pair("img0.png", 1, 9, "cpu")
    assert not torch.equal(p0["x"], p1["x"]) and p0["caption"] == "a red house"  # two draws, one caption
    # each stored step is the teacher's CFG'd DDIM step from the previous state (fp16 storage)
    trainer = Trainer(_cfg(data, tmp_path / "check", start_strength=0.3), STDMethod)
    m = trainer.method
    m.setup()
    x, n = p0["x"][None], torch.tensor([9])
    ctx = {k: v[None] for k, v in p0["ctx"].items()}
    with torch.no_grad(), m.teacher():
        cond = x0_eps(m.unet(x, n, ctx), x, m.grid.alpha(n))
        unc = x0_eps(m.unet(x, n, m.uncond(1, ctx)), x, m.grid.alpha(n))
    x0_t, eps_t = cfg_lcm(cond, unc, torch.tensor([p0["w"]]))
    assert torch.allclose(jump(x0_t, eps_t, m.grid.alpha_prev(n))[0], p0["x_prev"], atol=2e-2, rtol=1e-2)
    assert bank_cli(["oops"]) == 2
    assert cli(["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "t"), "--bank-source",
                str(trajectories), "--start-strength", "0.35"]) == 2
    assert "was built with other settings: start_strength 0.3 -> 0.35" in capsys.readouterr().err


def test_video_mode_trains_clips_with_a_motion_module_from_random_offsets(tmp_path):
    from comfyui_std.core.video import save_video
    from training.common.data import Item, clip_offset

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
    assert files == {f"{NAME}.safetensors", f"{NAME}_diffusers.safetensors", f"{NAME}_motion.safetensors"}
    with safe_open(str(out / f"{NAME}_motion.safetensors"), "pt") as f:
        motion = list(f.keys())
    with safe_open(str(out / f"{NAME}.safetensors"), "pt") as f:
        image = list(f.keys())
        assert json.loads(f.metadata()["std.kind"]) == "v2v"
    assert motion and all("motion_modules" in k for k in motion)
    assert image and not any("motion" in k for k in image)
    bank = json.loads((checkpoints(out / "checkpoints")[-1] / "bank" / "rank0" / "bank.json").read_text())
    entry = bank["entries"][0]
    with safe_open(str(checkpoints(out / "checkpoints")[-1] / "bank" / "rank0" / entry["file"]), "pt") as f:
        assert f.get_slice("state").get_shape()[:2] == [4, 3]  # one noise level for the whole 3-frame clip
    item = Item(data / "c0.mp4", "", True, 64, 48, 10)
    offsets = {clip_offset(item, 3, 2, torch.Generator().manual_seed(s)) for s in range(40)}
    assert offsets == set(range(6))  # every start that leaves room for 3 frames 2 apart
    assert clip_offset(item, 3, 2, None) == 0
    assert cli(["--preset", "tiny-video", "--data", str(data), "--output", str(out / "x"), "--motion-adapter",
                ""]) == 2


def test_aspect_buckets_keep_batches_to_one_size(tmp_path):
    from training.common.data import BucketSampler, assign_buckets, bucket_sizes, scan_folder

    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 for h, w in sizes)
    assert max(max(h / w, w / h) for h, w in sizes) <= 2
    folder = image_folder(tmp_path / "d", 6, sizes=[(64, 64), (64, 128), (128, 64), (70, 70), (60, 120), (120, 64)])
    items, _ = scan_folder(str(folder))
    buckets = assign_buckets(items, 64)
    assert buckets[0] == (64, 64) and buckets[1][1] > buckets[1][0] and buckets[2][0] > buckets[2][1]
    assert buckets[1] == buckets[4] and buckets[2] == buckets[5]
    sampler = BucketSampler(buckets, 2, seed=3)
    seen = []
    for step in range(sampler.per_epoch * 2):
        bucket, idx = sampler.batch(step)
        assert all(buckets[i] == bucket for i in idx) and len(idx) == 2
        seen += idx
    assert set(seen) == set(range(6))
    assert [sampler.batch(s) for s in range(5)] == [BucketSampler(buckets, 2, seed=3).batch(s) for s in range(5)]
    assert assign_buckets(items, 64, enabled=False) == [(64, 64)] * 6


def test_sdxl_size_conditioning_follows_the_crop():
    from std_hf.base import time_ids
    from training.common.data import Item, load_pixels

    item_path = REPO / "docs" / "gradio_app.png"
    with Image.open(item_path) as im:
        w, h = im.size
    item = Item(item_path, "", False, w, h)
    pixels, crop = load_pixels(item, (64, 128), torch.Generator().manual_seed(1))
    assert pixels.shape == (3, 64, 128) and crop.original == (h, w)
    ids = time_ids(crop.original, (64, 128), (crop.top, crop.left))
    assert ids.tolist() == [[h, w, crop.top, crop.left, 64, 128]]


def test_latent_cache_on_disk_is_reused(data, tmp_path, monkeypatch):
    cfg = _cfg(data, tmp_path / "out", "--cache-latents", "true", max_steps=3, num_previews=0)
    Trainer(cfg, STDMethod).run()
    cached = sorted((tmp_path / "out" / "latent_cache").glob("*.safetensors"))
    assert cached and set(load_file(str(cached[0]))) >= {"mean", "std", "mean_flip", "std_flip", "crop", "original"}
    import training.std.method as m

    def no_pixels(*a, **k):
        raise AssertionError("a cached latent was encoded again")
    monkeypatch.setattr(m, "load_pixels", no_pixels)
    cfg2 = _cfg(data, tmp_path / "again", "--cache-latents", "true", "--latent-cache-dir",
                str(tmp_path / "out" / "latent_cache"), max_steps=3, num_previews=0)
    Trainer(cfg2, STDMethod).run()


def test_bf16_keeps_the_lora_and_its_optimiser_state_fp32_and_offloads_text(data, tmp_path):
    cfg = _cfg(data, tmp_path, "--mixed-precision", "bf16", "--offload-text-encoders", "true", max_steps=2,
               num_previews=0)
    trainer = Trainer(cfg, STDMethod)
    m = trainer.method

    def forbidden(*a, **k):
        raise AssertionError("a text encoder ran after the captions were cached")
    original_setup = m.setup

    def setup():
        original_setup()
        m.base.text_encoders[0].forward = forbidden
    m.setup = setup
    trainer.run()
    frozen = [p for n, p in m.base.unet.named_parameters() if ".lora_" not in n]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for _, p in m._student_params()} == {torch.float32}
    opt = trainer.optimizers["student"][0]
    assert {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert next(m.base.text_encoders[0].parameters()).dtype == torch.bfloat16


def test_the_lora_init_is_one_fp32_draw_whatever_the_frozen_dtype():
    """The frozen weights may be read in bf16 (host RAM); PEFT would then create the LoRA in bf16, rounding its
    init: the init is drawn in fp32 from the seed instead, the same for an fp32 and a bf16 UNet."""
    from std_hf.base import cast_floats
    from std_hf.tiny import make_unet
    from training.common.config import LORA_TARGETS
    from training.common.adapters import add_lora

    fp32, bf16 = make_unet("sd15"), make_unet("sd15")
    cast_floats(bf16, torch.bfloat16)
    a, b = (add_lora(u, "student", 4, 4.0, LORA_TARGETS, seed=3) for u in (fp32, bf16))
    assert [n for n, _ in a] == [n for n, _ in b] and len(a) > 20
    assert all(p.dtype == q.dtype == torch.float32 and torch.equal(p, q) for (_, p), (_, q) in zip(a, b))
    downs = torch.cat([p.flatten() for n, p in a if ".lora_A." in n])
    assert all(torch.count_nonzero(p) == 0 for n, p in a if ".lora_B." in n)
    assert abs(float(downs.std()) - 1 / 4) < 0.01  # PEFT's "gaussian": N(0, 1/r²)
    again = add_lora(make_unet("sd15"), "student", 4, 4.0, LORA_TARGETS, seed=4)
    assert not torch.equal(a[0][1], again[0][1])  # the seed decides


def test_fp16_uses_one_gradient_scaler_per_optimiser_and_skips_inf_steps(data, tmp_path):
    trainer = Trainer(_cfg(data, tmp_path), STDMethod)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer.optimizers = {"student": (opt, sched, 0.0)}
    trainer.scalers = {"student": torch.amp.GradScaler("cpu", init_scale=1024.0)}
    trainer._backward("student", (w * 2).sum())
    assert torch.allclose(w.grad, torch.full((3,), 2048.0))  # scaled by the scaler
    trainer._sync_and_step()
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))  # unscaled before the step: 1 - 0.1 * 2
    trainer._backward("student", (w * float("inf")).sum())
    trainer._sync_and_step()
    assert torch.allclose(w.detach(), torch.full((3,), 0.8)) and trainer.scalers["student"].get_scale() == 512.0


def test_the_paper_gamma_window_is_used_when_chosen(data, tmp_path, monkeypatch):
    import training.std.method as m

    seen = []
    real = m.draw_target_index

    def spy(index, window, gen, mode="official", gamma=0.7, grid=None):
        j = real(index, window, gen, mode, gamma, grid)
        seen.append((mode, gamma, grid.timesteps[(j - 1).clamp(min=0)].float() / grid.timestep(index).float()))
        return j
    monkeypatch.setattr(m, "draw_target_index", spy)
    Trainer(_cfg(data, tmp_path, "--s-window", "paper", "--s-gamma", "0.6", max_steps=3, num_previews=0),
            STDMethod).run()
    assert seen and all(mode == "paper" and gamma == 0.6 for mode, gamma, _ in seen)
    ratios = torch.cat([r for *_, r in seen])
    assert bool((ratios >= 0.6).all())
    with safe_open(str(tmp_path / f"{NAME}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["std.s_window"]) == "paper" and json.loads(meta["std.s_gamma"]) == 0.6


def test_ema_target_is_an_option_and_checkpointed(data, tmp_path):
    trainer = Trainer(_cfg(data, tmp_path, max_steps=2, ema_target=True, ema_decay=0.5, num_previews=0),
                      STDMethod)
    trainer.run()
    sd = load_file(str(checkpoints(tmp_path / "checkpoints")[-1] / "trainable.safetensors"))
    ema = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
    online = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    assert ema.keys() == online.keys() and ema
    assert any(not torch.equal(ema[k], online[k]) for k in ema)


def _tiny_ip_files(tmp_path, cross_dim=32, single_file_encoder=False):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from std_hf.tiny import make_unet

    from comfyui_std.core.style_blocks import ip_layer_order

    unet = make_unet("sd15")
    order = ip_layer_order([n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")])
    inner = [unet.get_submodule(n).to_k.out_features for n in order]
    n_layers = len(order)
    g = torch.Generator().manual_seed(0)
    sd = {"image_proj.proj.weight": torch.randn(4 * cross_dim, 16, generator=g) * 0.3,
          "image_proj.proj.bias": torch.zeros(4 * cross_dim), "image_proj.norm.weight": torch.ones(cross_dim),
          "image_proj.norm.bias": torch.zeros(cross_dim)}
    for k in range(n_layers):
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = torch.randn(inner[k], cross_dim, generator=g) * 0.3
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = torch.randn(inner[k], cross_dim, generator=g) * 0.3
    save_file(sd, str(tmp_path / f"ip_{cross_dim}.safetensors"))
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=16,
                                                         projection_dim=16))
    if single_file_encoder:  # a ComfyUI clip_vision file
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
        encoder = tmp_path / "encoder.safetensors"
    else:
        enc.save_pretrained(tmp_path / "encoder")
        encoder = tmp_path / "encoder"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    return tmp_path / f"ip_{cross_dim}.safetensors", encoder, tmp_path / "s.png"


def test_style_image_conditions_only_the_teacher_on_the_style_blocks(data, tmp_path):
    from comfyui_std.core.style_blocks import selects, target_blocks

    ip, enc, img = _tiny_ip_files(tmp_path, single_file_encoder=True)
    cfg = _cfg(data, tmp_path / "o", max_steps=2, num_previews=0, style_image=str(img), ip_adapter=str(ip),
               image_encoder=str(enc))
    trainer = Trainer(cfg, STDMethod)
    m = trainer.method
    m.setup()
    on = {k[: -len(".processor")] for k, v in m.style_ref.preset_scales.items() if v}
    assert on and all(selects(k, target_blocks("style", "sd15")) for k in on)
    x, n = torch.randn(1, 4, 8, 8), torch.tensor([30])
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
    assert Trainer(cfg, STDMethod).run() and (tmp_path / "o" / f"{NAME}.safetensors").exists()
    (tmp_path / "x").mkdir()
    ip_sdxl, _, _ = _tiny_ip_files(tmp_path / "x", cross_dim=2048)
    base = ["--preset", "tiny", "--data", str(data), "--output", str(tmp_path / "p"), "--style-image", str(img)]
    assert cli(base + ["--ip-adapter", str(ip_sdxl), "--image-encoder", str(enc)]) == 2
    assert cli(base + ["--ip-adapter", str(ip), "--image-encoder", str(tmp_path / "nope")]) == 2
    assert cli(base) == 2


def test_an_sdxl_run_without_the_memory_saving_settings_is_told_the_presets(data, tmp_path, monkeypatch, caplog):
    """Without --preset an SDXL run trains in fp32 without checkpointing: it says which preset fits a 12/24 GB card.
    The base is read through Trainer.in_turn (ranks one after another; once in one process)."""
    import logging

    import training.std.method as m
    from std_hf.base import tiny_base

    reads = []
    monkeypatch.setattr(m, "load_base", lambda *a, **k: reads.append(1) or tiny_base("sdxl"))
    cfg = _cfg(data, tmp_path / "out", max_steps=1, num_previews=0)
    with caplog.at_level(logging.WARNING, logger="training"):
        Trainer(cfg, STDMethod).run()
    assert reads == [1]
    assert any("--preset sdxl-12gb or --preset sdxl-24gb" in r.getMessage() for r in caplog.records)
