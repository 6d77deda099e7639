"""SiD-LSG trainer on tiny random models (CPU): losses, gradient routing between the two adapters on one shared
base (the peft pitfalls of docs/official-sid-lsg-code.md §7), reproducible and exactly resumable runs, export metadata
and bad input."""

import json
import os
import signal
import stat
import sys

import pytest
import torch
from safetensors import safe_open
from train_helpers import same_tensors, stop_a_training_run, stop_at, tensors

from training.common.config import config_from_argv
from training.common.trainer import Trainer, checkpoints
from training.sid_lsg.__main__ import main as cli
from training.sid_lsg.losses import ema_beta, guided, sid_generator_loss, x0_from_eps
from training.sid_lsg.method import FAKE, GEN, PRESETS, SiDConfig, SiDMethod


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("p") / "prompts.txt"
    p.write_text("a red apple\n\na lighthouse at dusk\na cat in the snow\n")
    return p


def _cfg(prompts, out, **kw):
    return config_from_argv(SiDConfig, PRESETS, ["--preset", "tiny", "--prompts", str(prompts), "--output", str(out)],
                            **kw)


def test_generator_loss_matches_its_formula_and_detaches_only_w():
    g = torch.Generator().manual_seed(0)
    x_g = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    y_r, y_f = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    loss = sid_generator_loss(x_g, y_r, y_f, alpha=1.0)
    w = (x_g - y_r).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = ((y_r - y_f) * (y_f - x_g) / w).flatten(1).sum(1).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.allclose(x_g.grad, -((y_r - y_f) / w.detach()) / 2)  # d/dx_g with w held fixed, batch mean
    assert torch.equal(guided(None, y_r, 3.0), y_r) and torch.allclose(guided(y_f, y_r, 1.0), y_r)
    a = torch.tensor([0.5])
    assert torch.allclose(x0_from_eps(a.sqrt() * y_r + (1 - a).sqrt() * y_f, y_f, a), y_r, atol=1e-6)
    assert 0.99 < ema_beta(512, 10**9) < 0.995 and ema_beta(512, 0) < 1e-6


@pytest.fixture(scope="module")
def method(prompts, tmp_path_factory):
    trainer = Trainer(_cfg(prompts, tmp_path_factory.mktemp("m")), SiDMethod)
    trainer.method.setup()
    return trainer.method


def _grads(method):
    return {name: sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
            for name, params in method.params.items()}


def _zero(method):
    for params in method.params.values():
        for p in params:
            p.grad = None


@pytest.mark.parametrize("phase, trained", [(GEN, GEN), (FAKE, FAKE)])
def test_each_phase_routes_gradients_to_its_adapter_only(method, phase, trained):
    _zero(method)
    base_params = [p for n, p in method.base.unet.named_parameters() if ".gen." not in n and ".fake." not in n]
    for _, loss, _ in method.micro_step(0, phase):
        loss.backward()
    counts = _grads(method)
    other = FAKE if trained == GEN else GEN
    # gaussian init: lora_B = 0, so only the B matrices of the trained adapter receive a nonzero gradient at step 0
    assert counts[trained] >= len(method.params[trained]) // 2 and counts[other] == 0
    assert all(p.grad is None for p in base_params)
    _zero(method)


def test_the_peft_pitfall_is_real_so_the_flags_are_set_before_backward(method):
    """Naive order (generator forward, switch to teacher and fake, backward) leaves the generator's LoRA without
    gradients because peft rewrites requires_grad on every switch; SiDMethod re-activates the trained adapter and
    sets the flags after its last switch (test above)."""
    _zero(method)
    method.training = None  # no phase: peft's own flags, as a naive loop would have them
    z = torch.randn(1, 4, 8, 8)
    ctx = method.context(["a cat"])
    method.use(GEN)
    x_g = method.generate(z, ctx)
    method.use(None)
    method.use(FAKE)
    y = method.eps(x_g, torch.tensor([500]), ctx, 1.0)
    loss = (y - x_g).pow(2).mean()
    if loss.requires_grad:
        loss.backward()
    assert _grads(method)[GEN] == 0
    assert not any(p.requires_grad for p in method.params[GEN])
    _zero(method)


def test_the_generator_phase_keeps_no_graph_for_the_fake_adapters_weights(method):
    """In the generator phase the fake score runs with its adapter active, but its weights never require grad (peft's
    set_adapter turns them on; SiDMethod.use puts the phase's flags back), so no activations are saved for their
    gradients (measured at SD1.5 size: 1.74 GiB of saved activations instead of 1.44 before)."""
    _zero(method)
    seen = []
    fake_ids = {id(p) for p in method.params[FAKE]}

    def record(module, args):
        seen.extend(p.requires_grad for p in module.parameters(recurse=False) if id(p) in fake_ids)

    hooks = [m.register_forward_pre_hook(record) for m in method.base.unet.modules()]
    try:
        for _, loss, _ in method.micro_step(0, GEN):
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen)  # the fake adapter's weights ran, and never required grad
    assert all(p.grad is None for p in method.params[FAKE])
    _zero(method)


def test_at_init_generator_fake_and_teacher_agree(method):
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = method.context(["a cat"])
    outs = []
    with torch.no_grad():
        for adapter in (None, GEN, FAKE):
            method.use(adapter)
            outs.append(method.eps(x, t, ctx, 2.0))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_time_phases_covers_the_two_sid_phases(prompts, tmp_path):
    history = Trainer(_cfg(prompts, tmp_path / "t", max_steps=2, num_previews=0, time_phases=True), SiDMethod).run()
    phases = {k for h in history for k in h if k.startswith("time/")}
    assert phases == {f"time/{p}_s" for p in ("step", "text", "generator", "fake_score", "teacher", "backward",
                                               "optimizer")}, phases


def test_tiny_runs_are_reproducible_export_the_generator_and_resume_exactly(prompts, tmp_path):
    full = Trainer(_cfg(prompts, tmp_path / "a", max_steps=4, num_previews=0), SiDMethod).run()
    again = Trainer(_cfg(prompts, tmp_path / "b", max_steps=4, num_previews=0), SiDMethod).run()
    name = "sid_lsg_sd15_tiny_k2.safetensors"
    with safe_open(str(tmp_path / "a" / name), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["std.method"] == '"sid_lsg"' and json.loads(meta["std.t_init"]) == 625
    assert json.loads(meta["std.kappa4"]) == 2.0 and json.loads(meta["std.nfe"]) == 1
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    key = ["loss/fake", "loss/gen"]
    assert [[h[k] for k in key] for h in again] == [[h[k] for k in key] for h in full]
    assert same_tensors(tensors(tmp_path / "a" / name), tensors(tmp_path / "b" / name))  # two fresh runs
    cfg = _cfg(prompts, tmp_path / "c", max_steps=4, checkpoint_every=0, num_previews=0)
    with stop_at(SiDMethod, 2):
        first = Trainer(cfg, SiDMethod)
        first.run()
    assert first.interrupted and first.step == 2
    cfg.resume = "latest"
    rest = Trainer(cfg, SiDMethod).run()
    assert [[h[k] for k in key] for h in rest] == [[h[k] for k in key] for h in full]
    assert same_tensors(tensors(tmp_path / "a" / name), tensors(tmp_path / "c" / name))  # resumed = uninterrupted


BAD = [
    (["--prompts", "{empty}"], "holds no non-empty lines"),
    (["--prompts", "{missing}"], "does not exist"),
    (["--prompts", "{binary}"], "is a binary file, not UTF-8 text"),
    (["--prompts", "{latin1}"], "is not UTF-8 text (invalid byte at offset 2)"),
    (["--prompts", "{folder}"], "is not a file"),
    (["--base", "{missing}"], "was not found"),
    (["--gradient-checkpointing", "true"], "adapter switching"),
    (["--t-min", "900", "--t-max", "100"], "t_max"),
    (["--t-init", "1000"], "t_init: got 1000"),
    (["--kappa4", "-1"], "kappa4"),
    (["--max-steps", "-1"], "max_steps: got -1"),
    (["--max-steps", "0"], "max_steps: got 0"),
    (["--batch-size", "-2"], "batch_size"),
    (["--fake-learning-rate", "inf"], "expected a finite number"),
    (["--fake-rank", "-1"], "fake_rank"),
    (["--ema-rampup", "2"], "ema_rampup"),
    (["--prompt-dropout", "1.5"], "prompt_dropout"),
    (["--mixed-precision", "fp64"], "--mixed-precision"),
    (["--output", "{file}"], "output: "),
    (["--output", "{file}/sub"], "cannot write into"),
    (["--lora-alpha", "0"], "lora_alpha"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_cli_bad_input(prompts, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("ca\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "file").write_text("x")
    subst = {"{empty}": tmp_path / "empty.txt", "{missing}": tmp_path / "nope", "{binary}": tmp_path / "binary.txt",
             "{latin1}": tmp_path / "latin1.txt", "{folder}": tmp_path, "{file}": tmp_path / "file"}
    for k, v in subst.items():
        args = [a.replace(k, str(v)) for a in args]
    assert cli(["--preset", "tiny", "--prompts", str(prompts), "--output", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.safetensors"))  # nothing untrained is exported


def test_full_finetune_option_trains_copies_and_exports_merged_weights(prompts, tmp_path):
    from diffusers import UNet2DConditionModel

    trainer = Trainer(_cfg(prompts, tmp_path, max_steps=2, num_previews=0, full_finetune=True), SiDMethod)
    m = trainer.method
    m.setup()
    assert m.nets[GEN] is not m.nets[FAKE] and m.nets[GEN] is not m.base.unet
    for _, loss, _ in m.micro_step(0, GEN):
        loss.backward()
    assert all(p.grad is not None for p in m.nets[GEN].parameters() if p.requires_grad)
    assert all(p.grad is None for p in m.nets[FAKE].parameters()) and all(p.grad is None for p in
                                                                            m.base.unet.parameters())
    trainer = Trainer(_cfg(prompts, tmp_path / "run", max_steps=2, num_previews=0, full_finetune=True), SiDMethod)
    old = os.umask(0o077)  # a strict umask must not make the export unreadable for others
    try:
        trainer.run()
    finally:
        os.umask(old)
    folder = tmp_path / "run" / "sid_lsg_sd15_tiny_k2_unet"
    unet = UNet2DConditionModel.from_pretrained(folder)
    assert json.loads((folder / "std_metadata.json").read_text())["t_init"] == 625
    ema = {k[4:]: v for k, v in trainer.method.trainable_state().items() if k.startswith("ema.")}
    assert torch.allclose(unet.state_dict()["conv_in.weight"], ema["conv_in.weight"])
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o644}
    # the export is atomic: a failure while writing keeps the previous one whole and leaves nothing else behind
    before = sorted(p.name for p in (tmp_path / "run").iterdir())

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    from unittest import mock
    with mock.patch.object(UNet2DConditionModel, "save_pretrained", broken):
        with pytest.raises(OSError, match="No space left"):
            trainer.method.export(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert torch.equal(UNet2DConditionModel.from_pretrained(folder).state_dict()["conv_in.weight"],
                       unet.state_dict()["conv_in.weight"])


def test_two_processes_keep_identical_replicas(prompts, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from training.common.trainer import checkpoints

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "training.sid_lsg", "--preset", "tiny", "--prompts", str(prompts), "--output", str(tmp_path),
           "--max-steps", "2", "--checkpoint-every", "0", "--num-previews", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = checkpoints(tmp_path / "checkpoints")[-1]
    r0, r1 = (json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["trainable_sha256"] == r1["trainable_sha256"]


def test_sigterm_stops_a_sid_run_with_a_checkpoint_and_exits_143(prompts, tmp_path):
    """The SiD-LSG trainer ends on SIGTERM as the STD one does: the step finishes, a checkpoint is written, the resume
    command is printed, exit 143. Bug caught: SIGTERM killed the run with no checkpoint."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.sid_lsg", "--preset", "tiny", "--prompts", str(prompts), "--output",
           str(out), "--max-steps", "100000", "--checkpoint-every", "0", "--num-previews", "0", "--log-every", "1"]
    returncode, err = stop_a_training_run(cmd, out, signal.SIGTERM)
    assert returncode == 143, err[-2000:]
    assert "Traceback" not in err and "terminated (SIGTERM) at step" in err and "--resume latest" in err
    assert len(checkpoints(out / "checkpoints")) == 1
