"""The memory plan in the app's engine, on the tiny zoo: offload placements, VAE sub-batching, planned tiling and
fused LoRAs change where and when the work happens, not the result."""

import dataclasses
import logging
import subprocess
import sys

import pytest
import torch

from comfyui_std.core.chunks import Chunking
from std_app.settings import StyleSettings
from std_app.startup import load_engine, tiny_options
from std_hf.memory import MemoryPlan

FRAMES = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0))
LORA = "std_tiny_v2v_eta0.75"


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    return tiny_options("sd15", tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def reference(options):
    """Everything on the device, LoRA fused: the default."""
    engine = load_engine(options)
    return engine, engine.run(FRAMES, StyleSettings(nfe=2, lora=LORA, seed=3), progress_bar=False).frames


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_the_same_frames(options, reference, mode):
    """model: each component moves to the device for its stage (bit-identical); sequential: UNet and VAE weights
    stream layer by layer through accelerate's hooks (the LoRA is not fused there, so float rounding differs)."""
    engine = load_engine(dataclasses.replace(options, offload=mode))
    assert engine.offload == mode
    out = engine.run(FRAMES, StyleSettings(nfe=2, lora=LORA, seed=3), progress_bar=False).frames
    if mode == "model":
        assert torch.equal(out, reference[1])
        assert all(p.device.type == "cpu" for p in engine.pipe.unet.parameters())  # back on the CPU after
    else:
        assert next(engine.pipe.unet.parameters()).device.type == "meta"  # weights live in the hooks' CPU map
        assert (out - reference[1]).abs().max() < 1e-5


def test_fused_lora_equals_the_unfused_adapter_and_switching_restores_the_weights(options, reference):
    """The fused LoRA gives the adapter's result within float rounding; a new scale, another run of the base model
    (the teacher) and the LoRA again all see the right weights (a fuse that was never undone would add the delta
    twice or leave it in the teacher)."""
    fused_engine, fused = reference
    plain = load_engine(options)
    plain.fuse_loras = False
    settings = StyleSettings(nfe=2, lora=LORA, seed=3)
    unfused = plain.run(FRAMES, settings, progress_bar=False).frames
    assert fused_engine._fused is not None and plain._fused is None
    assert (fused - unfused).abs().max() < 1e-5
    half = dataclasses.replace(settings, lora_scale=0.5)
    assert (fused_engine.run(FRAMES, half, progress_bar=False).frames
            - plain.run(FRAMES, half, progress_bar=False).frames).abs().max() < 1e-5
    teacher = fused_engine.run(FRAMES, settings, teacher_steps=3, progress_bar=False).frames
    assert fused_engine._fused is None
    assert (teacher - plain.run(FRAMES, settings, teacher_steps=3, progress_bar=False).frames).abs().max() < 1e-5
    assert (fused_engine.run(FRAMES, settings, progress_bar=False).frames - unfused).abs().max() < 1e-5


def test_vae_sub_batches_leave_the_frames_unchanged(options, monkeypatch):
    """A plan that codes one frame per VAE call gives the frames of the whole-batch call, in memory and streamed."""
    engine = load_engine(options)
    settings = StyleSettings(nfe=2, lora=LORA, seed=3)
    whole = engine.run(FRAMES, settings, chunking=Chunking(3), progress_bar=False).frames
    calls = []
    encode = engine.codec.encode

    def spy(pixels, generator=None, batch=None):
        calls.append(batch)
        return encode(pixels, generator, batch)

    one = MemoryPlan("cpu", 2 ** 30, "none", 1, False, 0, 0)
    monkeypatch.setattr(engine, "memory_plan", lambda *a, **k: one)
    monkeypatch.setattr(engine.codec, "encode", spy)
    sub = engine.run(FRAMES, settings, chunking=Chunking(3), progress_bar=False).frames
    assert calls == [1] and torch.allclose(sub, whole, atol=1e-6)


def test_planned_tiling_tiles_any_size_and_is_restored(options, monkeypatch):
    """When one frame does not fit, the VAE tiles even frames below diffusers' own tile size, then the VAE's
    settings come back."""
    import std_app.engine as engine_module

    engine = load_engine(options)
    vae = engine.pipe.vae
    before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    frames = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    settings = StyleSettings(nfe=2, seed=3)
    plain = engine.run(frames, settings, progress_bar=False).frames
    monkeypatch.setattr(engine_module, "TILE_PIXELS", 32)
    tiled_plan = MemoryPlan("cpu", 2 ** 30, "none", 1, True, 0, 0)
    monkeypatch.setattr(engine, "memory_plan", lambda *a, **k: tiled_plan)
    tiled = engine.run(frames, settings, progress_bar=False).frames
    assert not torch.equal(tiled, plain)  # tiles blend: close, not identical (64 px is below diffusers' own tile)
    assert (tiled - plain).abs().mean() < 0.1
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == before


def test_the_plan_is_logged_at_start(options, caplog):
    with caplog.at_level(logging.INFO, logger="std_app"):
        load_engine(dataclasses.replace(options, vram_budget=2.0))
    line = next(r.getMessage() for r in caplog.records if "memory plan" in r.getMessage())
    assert line.startswith("device cpu; memory plan on cpu (2.0 GiB): offload none, VAE ")
    assert "UNet float32, VAE float32" in line


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [(["--vram-budget", "0"], "--vram-budget: got 0.0, allowed range is [0.25, 4096.0]"),
                                           (["--vram-budget", "lots"], "expected a number of GiB, got 'lots'"),
                                           (["--offload", "half"], "argument --offload: invalid choice: 'half'")])
def test_bad_memory_flags_are_refused(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "std_app.batch", "--tiny", str(tmp_path), "--output",
                           str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
