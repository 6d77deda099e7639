"""Motion modules as users have them, and videos run as the STD v2v LoRAs were trained (the app side).

Files in the three layouts (AnimateDiff, Hotshot-XL, diffusers) are written here from one random tiny module; each
loads strictly with every tensor counted, the base is read from the tensors, ``.ckpt`` files only through the
weights-only loader. With ``--motion-module`` the engine runs each video chunk as one clip through the module and
applies a v2v LoRA whole (its motion layers fused into the module, restored exactly when the LoRA changes); images
skip the module. The batch CLI stylizes a 20-frame clip with audio this way.
"""

import json
import re
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file, save_file

from media_files import capture_written_frames, write_clip
from comfyui_std.core import STDInputError
from comfyui_std.core.chunks import Chunking
from comfyui_std.core.motion_format import from_diffusers
from comfyui_std.core.video import load_video
from std_app import tiny
from std_app.engine import StyleSettings
from std_app.startup import load_engine, tiny_options
from std_hf.motion import load_motion_adapter
from std_hf.tiny import make_unet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny.build_tiny_models(tmp_path_factory.mktemp("tiny"), "sd15")


@pytest.fixture(scope="module")
def modules(zoo, tmp_path_factory):
    """The tiny motion module written in every layout (same tensors), plus an SDXL one."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("animatediff_models")
    unet = UNet2DConditionModel.from_pretrained(str(zoo / "diffusers" / "tiny-sd15"), subfolder="unet")
    sd = load_motion_adapter("tiny", like_unet=unet).adapter.state_dict()
    save_file(from_diffusers(sd, "animatediff"), str(folder / "mm_tiny_v3.safetensors"))
    torch.save(from_diffusers(sd, "animatediff"), str(folder / "mm_tiny_v3.ckpt"))
    save_file(from_diffusers(sd, "hotshotxl"), str(folder / "hsxl_temporal_layers_tiny.safetensors"))
    xl = load_motion_adapter("tiny", like_unet=make_unet("sdxl")).adapter.state_dict()
    save_file(from_diffusers(xl, "animatediff"), str(folder / "mm_sdxl_tiny.safetensors"))
    return folder, sd


@pytest.fixture(scope="module")
def engines(zoo):
    return {"plain": load_engine(tiny_options("sd15", zoo)),
            "motion": load_engine(dataclass_replace(tiny_options("sd15", zoo), motion_module="tiny"))}


def dataclass_replace(options, **kw):
    import dataclasses

    return dataclasses.replace(options, **kw)


def settings(**kw):
    return StyleSettings(**{"prompt": "an oil painting", "nfe": 2, "lora": "std_tiny_v2v_eta0.75", "seed": 5,
                            "cfg": 3.0, **kw})


# -- files -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, layout", [("mm_tiny_v3.safetensors", "animatediff"), ("mm_tiny_v3.ckpt", "animatediff"),
                                          ("hsxl_temporal_layers_tiny.safetensors", "hotshotxl")])
def test_each_layout_loads_every_tensor_into_the_same_module(modules, name, layout):
    """Bug caught: a key mapped to the wrong place or dropped (strict load and equal tensors after the round trip)."""
    folder, sd = modules
    module = load_motion_adapter(str(folder / name))
    assert module.info.layout == layout and module.info.base == "sd15" and module.info.max_frames == 32
    raw = load_file(str(folder / name)) if name.endswith(".safetensors") else torch.load(str(folder / name),
                                                                                         weights_only=True)
    assert module.line().endswith(f"{len(raw)}/{len(raw)} tensors loaded")
    loaded = module.adapter.state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_names_are_found_in_the_animatediff_models_folder_and_the_base_is_read(modules):
    folder, _ = modules
    models = folder.parent / "models"
    (models / "animatediff_models").mkdir(parents=True, exist_ok=True)
    target = models / "animatediff_models" / "mm_sdxl_tiny.safetensors"
    if not target.exists():
        target.write_bytes((folder / "mm_sdxl_tiny.safetensors").read_bytes())
    found = load_motion_adapter("mm_sdxl_tiny", models_dir=models)
    assert found.info.base == "sdxl" and found.info.layout == "animatediff" and found.info.block_channels == (16, 16, 32)


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": Payload()}))
    with pytest.raises(STDInputError, match="nothing in them is run"):
        load_motion_adapter(str(path))
    assert not marker.exists()


@pytest.mark.bad_input
def test_truncated_foreign_and_image_lora_files_are_refused(modules, zoo, tmp_path):
    folder, _ = modules
    sd = load_file(str(folder / "mm_tiny_v3.safetensors"))
    short = dict(sd)
    short.pop(next(k for k in short if k.endswith("to_v.weight")))
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(STDInputError, match=r"lacks 1 tensors .*truncated or foreign"):
        load_motion_adapter(str(tmp_path / "short.safetensors"))
    with pytest.raises(STDInputError, match="no AnimateDiff, Hotshot-XL or diffusers MotionAdapter keys"):
        load_motion_adapter(str(zoo / "loras" / "std_tiny_i2i_eta0.75.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((folder / "mm_tiny_v3.safetensors").read_bytes()[:5000])
    with pytest.raises(STDInputError, match="not a readable .safetensors file"):
        load_motion_adapter(str(tmp_path / "cut.safetensors"))
    (tmp_path / "cut.ckpt").write_bytes((folder / "mm_tiny_v3.ckpt").read_bytes()[:5000])
    with pytest.raises(STDInputError, match="could not be read as weights"):
        load_motion_adapter(str(tmp_path / "cut.ckpt"))
    odd = {k: v for k, v in sd.items() if k.startswith(("down_blocks.0.", "down_blocks.1."))}
    save_file(odd, str(tmp_path / "two_blocks.safetensors"))
    with pytest.raises(STDInputError, match="neither an SD1.5 .4. nor an SDXL .3. motion module"):
        load_motion_adapter(str(tmp_path / "two_blocks.safetensors"))


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix, poison", [(".safetensors", "nan"), (".ckpt", "inf"), (".safetensors", "int8")])
def test_a_module_with_non_finite_or_integer_weights_is_refused(modules, tmp_path, suffix, poison):
    """A NaN/inf weight made every frame NaN; an int8 one was converted into the float module without a word."""
    folder, _ = modules
    sd = load_file(str(folder / "mm_tiny_v3.safetensors"))
    key = sorted(k for k in sd if k.endswith("to_q.weight"))[0]
    sd[key] = sd[key].to(torch.int8) if poison == "int8" else torch.full_like(sd[key], float(poison))
    path = tmp_path / f"bad{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, str(path))
    expected = "is int8; the weights must be float tensors" if poison == "int8" else "non-finite value(s)"
    with pytest.raises(STDInputError, match=re.escape(f"'{path.name}': {key}") + ".*" + re.escape(expected)):
        load_motion_adapter(str(path))


# -- the engine ------------------------------------------------------------------------------------------------------

def test_images_skip_the_motion_module(engines):
    """Bug caught: a one-frame clip through the motion modules (not the image model's output)."""
    frames = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    s = settings(lora="std_tiny_i2i_eta0.75")
    a = engines["plain"].run(frames, s, progress_bar=False).frames
    b = engines["motion"].run(frames, s, progress_bar=False).frames
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_clip_runs_through_the_motion_module_and_its_frames_see_each_other(engines):
    """Bug caught: frames still stylized one by one (changing frame 0 would not change frame 1)."""
    frames = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    changed = frames.clone()
    changed[0] = 1 - changed[0]
    out = {}
    for name, engine in engines.items():
        for label, f in (("same", frames), ("changed", changed)):
            out[name, label] = engine.run(f, settings(), chunking=Chunking(4), progress_bar=False).frames
    assert torch.equal(out["plain", "same"][1:], out["plain", "changed"][1:])  # frame by frame without a module
    assert not torch.allclose(out["motion", "same"][1:], out["motion", "changed"][1:], atol=1e-4)
    assert not torch.allclose(out["motion", "same"], out["plain", "same"], atol=1e-4)


def test_the_v2v_lora_is_applied_whole_and_restored_exactly(engines, caplog):
    """Bug caught: motion layers dropped silently, or fused weights left behind when the LoRA changes."""
    engine = engines["motion"]
    unet = engine.pipe.unet
    engine.use_lora(None, 1.0)  # whatever an earlier test fused is restored first
    pristine = {k: v.clone() for k, v in unet.state_dict().items() if "motion_modules" in k}
    frames = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="std_app.motion"):
        with_lora = engine.run(frames, settings(lora="std_tiny_v2v_eta0.65"), chunking=Chunking(3), progress_bar=False).frames
    assert "motion LoRA: 192/192 tensors applied" in caplog.text
    assert engine._motion_fused is not None
    changed = [k for k, v in unet.state_dict().items() if "motion_modules" in k and not torch.equal(v, pristine[k])]
    assert len(changed) == 96  # every fused layer (to_q/k/v/out of both attentions)
    engine.use_lora(None, 1.0)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in pristine.items())
    again = engine.run(frames, settings(lora="std_tiny_v2v_eta0.65"), chunking=Chunking(3), progress_bar=False).frames
    assert torch.equal(again, with_lora)
    teacher = engine.run(frames, settings(lora="std_tiny_v2v_eta0.65"), chunking=Chunking(3), progress_bar=False, teacher_steps=2)
    assert teacher.frames.shape == frames.shape
    assert engine._motion_fused is None and all(torch.equal(unet.state_dict()[k], v) for k, v in pristine.items())


def test_the_motion_path_streams_like_it_runs_in_memory(engines, tmp_path, monkeypatch):
    seen = capture_written_frames(monkeypatch)
    clip = write_clip(tmp_path / "clip.mp4", frames=10, fps=12, size=(32, 32))
    engine = engines["motion"]
    chunking = Chunking(4, 1, "shared")
    engine.run_video_file(clip, tmp_path / "out.mp4", settings(), size=32, chunking=chunking)
    frames, _ = load_video(clip)
    reference = engine.run(frames, settings(), chunking=chunking, progress_bar=False)
    assert torch.equal(torch.cat(seen), reference.frames)


@pytest.mark.bad_input
def test_a_chunk_longer_than_the_positional_table_is_refused(engines):
    frames = torch.rand(33, 16, 16, 3)
    with pytest.raises(STDInputError, match="attends over at most 32"):
        engines["motion"].run(frames, settings(), chunking=Chunking(33), progress_bar=False)


@pytest.mark.bad_input
def test_motion_loras_that_do_not_fit_are_refused(engines, zoo, tmp_path):
    from std_app.models import lora_entry

    engine = engines["motion"]
    sd = load_file(str(zoo / "loras" / "std_tiny_v2v_eta0.75.safetensors"))
    meta = {"std.start_strength": "0.75", "std.kind": '"v2v"', "std.method": '"std"'}
    bad = {}
    key = next(k for k in sd if "motion_modules" in k and k.endswith("lora_A.weight"))
    wrong = dict(sd)
    wrong[key] = torch.zeros(4, 7)  # another module's width
    wrong[key.replace("lora_A", "lora_B")] = torch.zeros(wrong[key.replace("lora_A", "lora_B")].shape)
    bad["another module"] = (wrong, "do not fit the")
    half = dict(sd)
    half.pop(key.replace("lora_A", "lora_B"))
    bad["no up factor"] = (half, "has a lora_A factor but no lora_B")  # the LoRA check before any use
    for label, (state, message) in bad.items():
        path = tmp_path / f"std_tiny_v2v_{label.replace(' ', '_')}.safetensors"
        save_file(state, str(path), metadata=meta)
        entry = lora_entry(path)
        engine.catalog.entries[entry.name] = entry
        try:
            with pytest.raises(STDInputError, match=message):
                engine.run(torch.rand(2, 16, 16, 3), settings(lora=entry.name), chunking=Chunking(2),
                           progress_bar=False)
        finally:
            del engine.catalog.entries[entry.name]


@pytest.mark.bad_input
def test_a_module_for_the_other_base_is_refused_naming_both(modules, zoo):
    folder, _ = modules
    options = dataclass_replace(tiny_options("sd15", zoo), motion_module=str(folder / "mm_sdxl_tiny.safetensors"))
    with pytest.raises(STDInputError, match=r"motion module for SDXL .*, but the base model tiny-sd15 is SD1.5"):
        load_engine(options)


# -- the batch CLI ---------------------------------------------------------------------------------------------------

def run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "std_app.batch", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("module", ["tiny", "mm_tiny_v3.safetensors", "hsxl_temporal_layers_tiny.safetensors"])
def test_the_batch_cli_stylizes_a_20_frame_clip_through_the_module_with_audio(modules, tmp_path, module):
    folder, _ = modules
    clip = write_clip(tmp_path / "clip.mp4", frames=20, fps=12, size=(32, 48))
    spec = module if module == "tiny" else folder / module
    proc = run_cli(["--tiny", "--motion-module", spec, clip, "--output", tmp_path / "out", "--nfe", "2",
                    "--report", tmp_path / "report.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "motion LoRA: 192/192 tensors applied" in proc.stderr
    context = 8 if "hsxl" in str(spec) else 16
    assert f"(default {context})" in proc.stderr
    with av.open(str(tmp_path / "out" / "clip.mp4")) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        assert sum(1 for _ in c.decode(video=0)) == 20
        record = json.loads(c.metadata["comment"])
    assert record["frames_per_batch"] == context
    assert json.loads((tmp_path / "report.json").read_text())[0]["status"] == "done"


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--motion-module", "missing.safetensors"], "'missing.safetensors' was not found: it should be the motion module"),
    (["--motion-module", "{sdxl}"], "but the base model tiny-sd15 is SD1.5"),
    (["--motion-module", "tiny", "--frames-per-batch", "40"], "attends over at most 32"),
])
def test_batch_cli_motion_errors_are_one_line(modules, tmp_path, args, message):
    folder, _ = modules
    args = [str(folder / "mm_sdxl_tiny.safetensors") if a == "{sdxl}" else a for a in args]
    clip = write_clip(tmp_path / "clip.mp4", frames=40 if "40" in args else 4, fps=12, size=(16, 16))
    proc = run_cli(["--tiny", *args, clip, "--output", tmp_path / "out", "--nfe", "2"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# -- train, then use ---------------------------------------------------------------------------------------------------

def test_a_video_lora_trained_on_a_module_file_runs_whole_in_the_batch_cli(modules, zoo, tmp_path):
    """Trainer --motion-adapter <AnimateDiff-layout file> -> the exported v2v file (PEFT, both parts) -> the batch CLI
    with the same module applies every motion tensor. Bug caught: an export the app cannot use (motion layers only
    in a side file, or named otherwise than the motion model's paths)."""
    from safetensors import safe_open

    from training.std.__main__ import main as train

    folder, _ = modules
    module = folder / "mm_tiny_v3.safetensors"
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(2):
        write_clip(clips / f"c{i}.mp4", frames=10 + i, fps=8, size=(48, 64))
    out = tmp_path / "run"
    assert train(["--preset", "tiny-video", "--data", str(clips), "--output", str(out), "--max-steps", "1",
                  "--num-previews", "0", "--motion-adapter", str(module)]) == 0
    exported = out / "std_sd15_tiny_eta0.75_diffusers.safetensors"
    with safe_open(str(exported), "pt") as f:
        keys = list(f.keys())
    motion = [k for k in keys if "motion_modules" in k]
    assert motion and len(motion) < len(keys)
    proc = run_cli(["--models-dir", zoo, "--base", "tiny-sd15", "--device", "cpu", "--dtype", "fp32",
                    "--motion-module", module, "--lora", exported, "--use-lora", exported.stem,
                    write_clip(tmp_path / "clip.mp4", frames=6, fps=8, size=(32, 32)), "--output", tmp_path / "out",
                    "--nfe", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"motion LoRA: {len(motion)}/{len(motion)} tensors applied" in proc.stderr, proc.stderr[-3000:]


# -- choosing the module per video (the Video tab) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_engine(zoo, tmp_path_factory):
    """An engine started with a module from a folder that holds others: same structure (another context length),
    another structure (no mid block), and one for SDXL."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("modules") / "animatediff_models"
    folder.mkdir()
    unet = UNet2DConditionModel.from_pretrained(str(zoo / "diffusers" / "tiny-sd15"), subfolder="unet")
    shape = dict(block_out_channels=tuple(unet.config.block_out_channels), motion_layers_per_block=1,
                 motion_num_attention_heads=8, motion_norm_num_groups=16)
    for name, seed, extra in (("mm_a.safetensors", 0, {}), ("mm_b.safetensors", 1, {"motion_max_seq_length": 24}),
                              ("mm_nomid.safetensors", 2, {"use_motion_mid_block": False})):
        torch.manual_seed(seed)
        adapter = MotionAdapter(**shape, **extra)
        save_file(from_diffusers(adapter.state_dict(), "animatediff"), str(folder / name))
    xl = load_motion_adapter("tiny", like_unet=make_unet("sdxl")).adapter.state_dict()
    save_file(from_diffusers(xl, "animatediff"), str(folder / "mm_sdxl.safetensors"))
    return load_engine(dataclass_replace(tiny_options("sd15", zoo), motion_module=str(folder / "mm_a.safetensors")))


def _video(engine, clip, out, module):
    with pytest.MonkeyPatch.context() as patch:
        got = capture_written_frames(patch)
        result = engine.run_video_file(clip, out, settings(), size=32, chunking=Chunking(4), motion_module=module)
    return torch.cat(got), result


def test_the_video_run_switches_modules_in_place_and_back_exactly(folder_engine, engines, tmp_path):
    """Bug caught: a switch that leaves the old weights or positional table, or LoRA motion layers fitted to the
    previous module."""
    engine = folder_engine
    assert engine.motion_modules() == ["mm_a.safetensors", "mm_b.safetensors", "mm_nomid.safetensors",
                                       "mm_sdxl.safetensors"]
    clip = write_clip(tmp_path / "clip.mp4", frames=6, fps=8, size=(32, 32))
    a, result = _video(engine, clip, tmp_path / "a.mp4", None)
    assert result.record["motion_module"] == "mm_a.safetensors"
    b, result = _video(engine, clip, tmp_path / "b.mp4", "mm_b.safetensors")
    assert result.record["motion_module"] == "mm_b.safetensors" and engine.motion.info.max_frames == 24
    assert not torch.allclose(a, b, atol=1e-3)
    again, _ = _video(engine, clip, tmp_path / "a2.mp4", "mm_a.safetensors")
    assert torch.equal(again, a) and engine.motion.info.max_frames == 32
    none, result = _video(engine, clip, tmp_path / "n.mp4", "none (frame by frame)")
    plain, _ = _video(engines["plain"], clip, tmp_path / "p.mp4", None)
    assert result.record["motion_module"] is None and torch.allclose(none, plain, atol=1e-4)


@pytest.mark.bad_input
@pytest.mark.parametrize("choice, message", [("mm_nomid.safetensors", "is built otherwise than the loaded"),
                                             ("mm_sdxl.safetensors", "but the base model tiny-sd15 is SD1.5"),
                                             ("../loras/std_tiny_v2v_eta0.75.safetensors", "is not one of the motion"),
                                             ("/etc/passwd", "is not one of the motion modules on offer")])
def test_a_module_that_cannot_be_switched_to_is_refused_and_nothing_changes(folder_engine, tmp_path, choice,
                                                                            message):
    engine = folder_engine
    before = {k: v.clone() for k, v in engine.pipe.unet.state_dict().items() if "motion_modules" in k}
    name = engine.motion.name
    clip = write_clip(tmp_path / "clip.mp4", frames=4, fps=8, size=(16, 16))
    with pytest.raises(STDInputError, match=message):
        engine.run_video_file(clip, tmp_path / "x.mp4", settings(), chunking=Chunking(4), motion_module=choice)
    assert engine.motion.name == name and not (tmp_path / "x.mp4").exists()
    after = engine.pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.bad_input
def test_the_video_tab_takes_only_offered_modules(folder_engine, engines, tmp_path):
    import gradio as gr

    from std_app.handlers import StyleApp

    app = StyleApp(folder_engine, tmp_path, local_files=True)
    assert app.motion_choice("mm_b.safetensors") == "mm_b.safetensors"
    assert app.motion_choice(None) is None and app.motion_choice("none (frame by frame)") == "none (frame by frame)"
    for bad in ("../../x.ckpt", 3, ["mm_a.safetensors"]):
        with pytest.raises(STDInputError, match="choose one of: mm_a.safetensors"):
            app.motion_choice(bad)
    plain = StyleApp(engines["plain"], tmp_path, local_files=True)
    with pytest.raises(STDInputError, match="no motion module is loaded"):
        plain.motion_choice("mm_a.safetensors")
    assert isinstance(gr.Error("x"), Exception)
