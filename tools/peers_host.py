"""Interop with the node packs users combine with this one, against their real, unmodified code.

ComfyUI 0.3.64 boots here with this pack plus ComfyUI-VideoHelperSuite (VHS), ComfyUI-AnimateDiff-Evolved (ADE) and
ComfyUI_IPAdapter_plus (IPA+), installed the way a user installs them (a folder each under ``custom_nodes/``), runs
the interop scenarios through ComfyUI's own executor and writes what it measured to a JSON file; the assertions live
in ``tests/test_interop_peers.py``, which runs this module once per test session::

    python tools/peers_host.py --base DIR --results results.json [--peers DIR] [--only SCENARIO ...]

Why a process of its own: the peer packs change global state (VHS needs ``server.PromptServer.instance`` and hooks
``latent_preview.get_previewer`` at import; ADE swaps ``comfy.samplers.sampling_function`` while it samples and
injects modules into the UNet), so they never load into the in-process host the other real-host tests share.

The peer packs are read from ``$STD_PEERS_PATH``, else from ``shared/peers`` next to the repository (where CI has
them). Nothing is written into them or into the ComfyUI tree (bytecode goes under the base folder); both trees are
compared before and after the run and any change is reported.

What the scenarios need to know about the peers (facts measured against the pinned versions, see the table in
``peer_versions``):

* VHS's import reads ``PromptServer.instance.prompt_queue``, so a real ``server.PromptServer`` (never started) is
  created first. Its loaders decode with OpenCV and its Video Combine encodes with an ffmpeg binary, found through
  ``imageio-ffmpeg`` (requirements-dev.txt). ``VHS_VideoInfo`` splits the loader's VIDEO_INFO; ``loaded_fps``
  (output 5) is the frame rate after ``force_rate`` / ``select_every_nth``.
* ADE's loader only accepts a motion module in the exact AnimateDiff layout and widths (see
  ``write_motion_module``) and injects one temporal module after every UNet block that holds a ResBlock or a
  transformer, so it needs a UNet with SD1.5's block layout; the tiny 3-level checkpoint of ``comfy_host`` makes its
  injection fail (``IndexError``). ``build_sd15_layout`` builds the smallest SD1.5-layout checkpoint ComfyUI still
  detects as SD1.5. To keep that at half the memory the UNet weights stay in fp16 here (ComfyUI's ``--fp16-unet``);
  on CPU ComfyUI then casts each layer to fp32 to compute, so results equal an fp32 load of the same fp16 files.
* IPA+'s ``IPAdapterModelLoader`` returns ``{"image_proj": {...}, "ip_adapter": {...}}`` (plus flags for FaceID
  files), the layout ``STDStyleReference`` takes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: python tools/peers_host.py
    sys.path.insert(0, str(REPO))

from tools import comfy_host  # noqa: E402

API_DIR = REPO / "example_workflows" / "api"
UI_DIR = REPO / "example_workflows"
INTEROP_PREFIX = "interop_"


def interop_workflows() -> list[Path]:
    return sorted(API_DIR.glob(f"{INTEROP_PREFIX}*.json"))


def peer_versions(peers: Path) -> dict[str, str]:
    """version = ... of each peer's pyproject.toml (recorded with the results)."""
    import tomllib

    out = {}
    for name in comfy_host.PEER_PACKS:
        try:
            out[name] = tomllib.loads((Path(peers) / name / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, ValueError):
            out[name] = "unknown"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Test files: clips, the SD1.5-layout checkpoint, a motion module


def write_clip(path: Path, frames, fps: Fraction, audio_seconds: float = 0.0, lossless: bool = False) -> Path:
    """An h264 mp4 of uint8 ``frames`` [T, H, W, 3] at ``fps``, with a 440 Hz mono AAC track of ``audio_seconds``.

    ``lossless`` (qp 0, yuv444p) keeps every decoded frame exact, independent of the other frames."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv444p" if lossless else "yuv420p"
        video.options = {"qp": "0"} if lossless else {"crf": "16"}
        audio = container.add_stream("aac", rate=48000, layout="mono") if audio_seconds else None
        for a in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            n = int(48000 * audio_seconds)
            wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000)).astype(np.float32)
            for start in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + 1024].copy(), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 48000, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


def moving_square(count: int, size: int = 64, seed: int = 0):
    """uint8 frames [count, size, size, 3]: a noisy gradient with a bright square moving right."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = (np.linspace(40, 200, size)[None, :, None] + rng.integers(0, 30, (size, size, 3))).clip(0, 255)
    frames = np.repeat(base[None], count, 0).astype(np.uint8)
    for i in range(count):
        x = 4 + 3 * i
        frames[i, 20:36, x:x + 16] = (250, 230, 40)
    return frames


def probe(path: Path) -> tuple[dict, "object"]:
    """Read a video back with PyAV: (facts, frames as float [T, H, W, 3] in 0..1)."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]) / 255.0
        rate = stream.average_rate
        facts = {"frames": int(frames.shape[0]), "fps": float(rate), "fps_fraction": str(rate),
                 "width": int(frames.shape[2]), "height": int(frames.shape[1]),
                 "audio_streams": len(container.streams.audio)}
    return facts, frames


#: The smallest UNet with SD1.5's block layout (what ADE's injection needs): SD1.5's widths (320, 640, 1280, 1280)
#: and two res blocks per level, but only the one transformer ComfyUI's SD1.5 detection reads context_dim 768 from
#: (input block 1) and no middle transformer. 564M parameters (1.1 GB in fp16), against 860M for SD1.5.
SD15_LAYOUT_UNET = dict(comfy_host.TINY_UNET, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                        transformer_depth=[1, 0, 0, 0, 0, 0, 0, 0], transformer_depth_output=[0] * 12,
                        transformer_depth_middle=-1)


def _random_fp16(name: str, shape, generator, std: float = 0.02):
    import torch

    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    return torch.empty(shape, dtype=torch.float16).normal_(0.0, std, generator=generator)


def sd15_layout_unet_meta():
    """The SD15_LAYOUT_UNET module on the meta device (shapes only)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(**SD15_LAYOUT_UNET, operations=comfy.ops.disable_weight_init)


def build_sd15_layout(path: Path, tiny_ckpt: Path, seed: int = 3) -> Path:
    """A single-file checkpoint with the SD15_LAYOUT_UNET (random, fp16) and the CLIP-L and TAESD of ``tiny_ckpt``."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = {k: v for k, v in load_file(str(tiny_ckpt)).items() if not k.startswith("model.diffusion_model.")}
    g = torch.Generator().manual_seed(seed)
    for k, v in sd15_layout_unet_meta().state_dict().items():
        sd[f"model.diffusion_model.{k}"] = _random_fp16(k, v.shape, g)
    save_file(sd, str(path))
    return path


#: AnimateDiff SD1.5 motion module widths: down blocks 0-3 hold 2 temporal modules each, up blocks 0-3 hold 3.
MM_DOWN = (320, 640, 1280, 1280)
MM_UP = (1280, 1280, 640, 320)


def motion_module_keys(channels: int, frames: int) -> dict[str, tuple[int, ...]]:
    """Key suffix -> shape of one AnimateDiff temporal module (``temporal_transformer.*``) of width ``channels``:
    GroupNorm, proj_in, one transformer block with two temporal self-attentions (to_q/k/v without bias, to_out.0
    with bias, a sinusoidal ``pos_encoder.pe`` [1, frames, c] each) and their LayerNorms, a GEGLU feed-forward
    (c -> 8c -> 4c -> c) with its LayerNorm, and proj_out."""
    c = channels
    keys = {"norm.weight": (c,), "norm.bias": (c,), "proj_in.weight": (c, c), "proj_in.bias": (c,),
            "proj_out.weight": (c, c), "proj_out.bias": (c,)}
    block = "transformer_blocks.0."
    for a in (0, 1):
        attn = f"{block}attention_blocks.{a}."
        keys.update({f"{attn}to_q.weight": (c, c), f"{attn}to_k.weight": (c, c), f"{attn}to_v.weight": (c, c),
                     f"{attn}to_out.0.weight": (c, c), f"{attn}to_out.0.bias": (c,),
                     f"{attn}pos_encoder.pe": (1, frames, c),
                     f"{block}norms.{a}.weight": (c,), f"{block}norms.{a}.bias": (c,)})
    keys.update({f"{block}ff.net.0.proj.weight": (8 * c, c), f"{block}ff.net.0.proj.bias": (8 * c,),
                 f"{block}ff.net.2.weight": (c, 4 * c), f"{block}ff.net.2.bias": (c,),
                 f"{block}ff_norm.weight": (c,), f"{block}ff_norm.bias": (c,)})
    return {f"temporal_transformer.{k}": s for k, s in keys.items()}


def write_motion_module(path: Path, seed: int = 4, std: float = 0.1) -> tuple[Path, int]:
    """A random motion module in the AnimateDiff v3 SD1.5 file layout; returns (path, number of tensors).

    The layout ADE reads: ``down_blocks.{0-3}.motion_modules.{0,1}.*`` and ``up_blocks.{0-3}.motion_modules.{0-2}.*``
    with the MM_DOWN / MM_UP widths (its loader builds the modules from these fixed widths and refuses missing,
    unexpected or mis-shaped keys). It tells SD1.5 from SDXL modules by the highest down block index (3 vs 2), v2
    from v1/v3 by a ``mid_block`` (none here), and v3 from v1 by 32-frame positional encodings (v1: 24).
    The pe tables are random here, like every other weight, so each frame position is told apart."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for blocks, widths, per_block in (("down_blocks", MM_DOWN, 2), ("up_blocks", MM_UP, 3)):
        for i, c in enumerate(widths):
            for j in range(per_block):
                for suffix, shape in motion_module_keys(c, 32).items():
                    sd[f"{blocks}.{i}.motion_modules.{j}.{suffix}"] = _random_fp16(suffix, shape, g, std)
    save_file(sd, str(path))
    return path, len(sd)


# ---------------------------------------------------------------------------------------------------------------
# Running graphs


class Session:
    """The booted host, the test files and one PromptExecutor (ComfyUI's cache keeps loaded models between runs)."""

    def __init__(self, host, base: Path):
        self.host, self.base, self.M = host, Path(base), host.M
        self.server = comfy_host.FakeServer()
        self.executor = comfy_host.new_executor(self.server)
        self.files: dict[str, str] = {}
        self.runs = 0
        self.built: dict[str, dict] = {}
        self._tiny = None

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API prompt; returns success, error messages, ui outputs and progress events."""
        import comfy.utils
        import execution

        self.runs += 1
        pid = f"peers-{self.runs}"
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not ok:
            return {"valid": False, "success": False, "errors": [json.dumps({"error": err, "nodes": node_errors},
                                                                            default=str)],
                    "outputs": {}, "progress": {}}
        self.server.events.clear()
        comfy.utils.set_progress_bar_global_hook(comfy_host.progress_hook(self.server))
        try:
            self.executor.execute(prompt, pid, {"client_id": self.server.client_id}, outputs)
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        progress: dict[str, list] = {}
        for event, data in self.server.events:
            if event == "progress":
                progress.setdefault(str(data["node"]), []).append([data["value"], data["max"]])
        errors = [d.get("exception_message", "") for e, d in self.server.events if e == "execution_error"]
        return {"valid": True, "success": bool(self.executor.success), "errors": errors,
                "outputs": json.loads(json.dumps(self.executor.history_result.get("outputs", {}), default=str)),
                "progress": progress}

    def saved(self, run: dict, node_id: str, kind: str) -> list[Path]:
        """Files a node saved (its ui entries of ``kind``: images, gifs, latents), as paths under output/."""
        items = run["outputs"].get(str(node_id), {}).get(kind, [])
        return [self.output / item.get("subfolder", "") / item["filename"] for item in items]

    def workflow(self, stem: str, **overrides) -> dict:
        """An example API workflow with the test's model and file names (comfy_host.prepare_workflow, plus the
        peers' loaders) and ``overrides`` as {"node_id.input": value}."""
        prompt = comfy_host.prepare_workflow(API_DIR / f"{stem}.json", self.files["ckpt"], self.files)
        for node in prompt.values():
            inputs = node["inputs"]
            if node["class_type"] == "IPAdapterModelLoader":
                inputs["ipadapter_file"] = self.files["ipadapter"]
            if node["class_type"] == "LoadImage" and inputs.get("image") == "std_style.png":
                inputs["image"] = self.files["style_image"]
        for key, value in overrides.items():
            nid, name = key.split(".", 1)
            prompt[nid]["inputs"][name] = value
        return prompt

    def tiny_models(self):
        """(model, clip, vae) of the tiny checkpoint, loaded once for direct node calls."""
        import torch

        if self._tiny is None:
            with torch.inference_mode():
                self._tiny = self.M["CheckpointLoaderSimple"]().load_checkpoint(self.files["ckpt"])[:3]
        return self._tiny

    def release(self):
        """Drop cached models between scenario groups (ADE's checkpoint is large)."""
        import comfy.model_management
        self.executor = comfy_host.new_executor(self.server)
        self._tiny = None
        comfy.model_management.unload_all_models()
        gc.collect()


def call(M, node_id: str, **kwargs):
    """Call a node directly (V1: FUNCTION, V3: execute) and return its outputs tuple."""
    return comfy_host.run_node(M[node_id], **kwargs)


def link_to(prompt: dict, node_id: str, name: str, source: list) -> dict:
    prompt = json.loads(json.dumps(prompt))
    prompt[node_id]["inputs"][name] = source
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    found = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(found) != 1:
        raise AssertionError(f"expected one {class_type} node, found {found}")
    return found[0]


def max_abs(a, b) -> float:
    import torch

    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def load_latent(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"].float()


# ---------------------------------------------------------------------------------------------------------------
# Scenarios: each returns a dict of measured facts; tests/test_interop_peers.py asserts on them. A new scenario
# (e.g. audio through STD Save Video once it takes an audio input) is one more decorated function here and one test.

SCENARIOS: dict[str, callable] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def prepare_files(s: Session) -> None:
    """Tiny checkpoint, LoRA, IP-Adapter, CLIP vision, style image and clips in the session's folders."""
    import numpy as np
    from PIL import Image

    models = s.base / "models"
    ckpt = comfy_host.build_tiny_sd15(models / "checkpoints" / "tiny_sd15.safetensors")
    s.files.update(ckpt=ckpt.name, tiny_ckpt_path=str(ckpt))
    model = s.tiny_models()[0]
    lora = models / "loras" / "tiny_std_eta0.75.safetensors"
    comfy_host.write_peft_lora(model, lora, metadata={"std.start_strength": "0.75", "std.nfe": "4"})
    s.files["lora"] = lora.name
    comfy_host.write_tiny_ip_adapter(model, models / "ipadapter" / "tiny_ip_adapter.safetensors")
    comfy_host.write_tiny_clip_vision(s.base, models / "clip_vision" / "tiny_clip_vision.safetensors")
    s.files.update(ipadapter="tiny_ip_adapter.safetensors", clip_name="tiny_clip_vision.safetensors")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(s.input / "interop_style.png")
    Image.fromarray(moving_square(1, seed=5)[0]).save(s.input / "std_content.png")
    s.files["style_image"] = "interop_style.png"
    # 12 frames at 12 fps with a 1 s audio track; 10 frames at NTSC 29.97 fps (30000/1001)
    write_clip(s.input / "interop_clip.mp4", moving_square(12), Fraction(12), audio_seconds=1.0)
    write_clip(s.input / "interop_ntsc.mp4", moving_square(10, seed=2), Fraction(30000, 1001))


@scenario
def workflows_round_trip(s: Session) -> dict:
    """Every interop UI workflow converts back to its API twin (the frontend's graphToPrompt, with the peers'
    node definitions)."""
    from tools.workflow_format import dynamic_form, ui_to_api

    out = {}
    for api_file in interop_workflows():
        ui = json.loads((UI_DIR / api_file.name).read_text())
        api = dynamic_form(json.loads(api_file.read_text()), s.host.nodes)
        got = ui_to_api(ui, s.host.nodes)
        out[api_file.stem] = {"equal": got == api,
                              "differences": sorted(k for k in set(got) | set(api) if got.get(k) != api.get(k))}
    return out


@scenario
def vhs_stylize_combine(s: Session) -> dict:
    """interop_vhs_video: VHS Load Video (upload) -> VAE Encode -> STD Stylize Video -> VAE Decode -> VHS Video
    Combine (with VHS's audio) and STD Save Video, both at VHS Video Info's loaded_fps."""
    prompt = s.workflow("interop_vhs_video")
    load, combine = node_of(prompt, "VHS_LoadVideo"), node_of(prompt, "VHS_VideoCombine")
    stylize, save = node_of(prompt, "STDStylizeVideo"), node_of(prompt, "STDSaveVideo")
    prompt[load]["inputs"].update(video="interop_clip.mp4", force_rate=8, frame_load_cap=6)
    prompt[stylize]["inputs"].update(nfe=2, frames_per_batch=4, overlap=1, cfg=1.0)
    run = s.run(prompt)
    out = {"run": run}
    if run["success"]:
        out["combine"] = [probe(p)[0] for p in s.saved(run, combine, "gifs")]
        out["combine_files"] = sorted(p.name for p in (s.output / "STD").glob("vhs_*"))
        out["std_save"] = [probe(p)[0] for p in s.saved(run, save, "images")]
        out["stylize_progress"] = run["progress"].get(stylize, [])
    return out


@scenario
def vhs_load_to_std_save(s: Session) -> dict:
    """VHS Load Video (skip 2, every 2nd frame of a 29.97 fps clip) -> STD Save Video at VHS's loaded_fps; the
    frames read back are compared with the IMAGE VHS loaded (direct node call)."""
    import torch

    settings = dict(video="interop_ntsc.mp4", force_rate=0, custom_width=0, custom_height=0, frame_load_cap=0,
                    skip_first_frames=2, select_every_nth=2, format="None")
    prompt = {"1": {"class_type": "VHS_LoadVideo", "inputs": settings},
              "2": {"class_type": "VHS_VideoInfo", "inputs": {"video_info": ["1", 3]}},
              "3": {"class_type": "STDSaveVideo", "inputs": {"images": ["1", 0], "fps": ["2", 5],
                                                             "filename_prefix": "STD/from_vhs", "format": "mp4"}}}
    run = s.run(prompt)
    out = {"run": run}
    if run["success"]:
        images, count, audio, info = call(s.M, "VHS_LoadVideo", **settings)
        facts, frames = probe(s.saved(run, "3", "images")[0])
        out.update(vhs={"frames": int(count), "shape": list(images.shape), "loaded_fps": info["loaded_fps"],
                        "source_fps": info["source_fps"]},
                   saved=facts, pixel_mean_abs_diff=float((torch.as_tensor(frames) - images.double()).abs().mean())
                   if list(frames.shape) == list(images.shape) else None)
    clip_audio = probe(s.input / "interop_clip.mp4")[0]["audio_streams"]
    _, _, audio, _ = call(s.M, "VHS_LoadVideo", **dict(settings, video="interop_clip.mp4", skip_first_frames=0,
                                                         select_every_nth=1))
    wave = audio["waveform"]  # VHS extracts the track with ffmpeg when first read
    out["vhs_audio"] = {"input_audio_streams": clip_audio, "sample_rate": int(audio["sample_rate"]),
                        "waveform_shape": list(wave.shape), "peak": float(wave.abs().max())}
    return out


@scenario
def std_load_to_vhs_combine(s: Session) -> dict:
    """STD Load Video (8 fps, 6 frames) -> VHS Video Combine at STD Load Video's fps output."""
    import torch

    load = dict(video="interop_clip.mp4", frame_load_cap=6, skip_first_frames=0, select_every_nth=1, force_rate=8.0,
                resize="crop", path="")
    prompt = {"1": {"class_type": "STDLoadVideo", "inputs": load},
              "2": {"class_type": "VHS_VideoCombine",
                    "inputs": {"images": ["1", 0], "frame_rate": ["1", 2], "loop_count": 0,
                               "filename_prefix": "STD/to_vhs", "format": "video/h264-mp4", "pingpong": False,
                               "save_output": True, "pix_fmt": "yuv420p", "crf": 19, "save_metadata": True,
                               "trim_to_audio": False}}}
    run = s.run(prompt)
    out = {"run": run}
    if run["success"]:
        frames_in = call(s.M, "STDLoadVideo", **load)[0]
        facts, frames = probe(s.saved(run, "2", "gifs")[0])
        out.update(saved=facts, loaded_frames=int(frames_in.shape[0]),
                   pixel_mean_abs_diff=float((torch.as_tensor(frames) - frames_in.double()).abs().mean())
                   if list(frames.shape) == list(frames_in.shape) else None)
    return out


@scenario
def ipadapter_plus_loader(s: Session) -> dict:
    """interop_ipadapter_plus_style with IPA+'s IPAdapterModelLoader, and the same graph with STD IP-Adapter
    Loader instead and without the style reference; latents saved after STD Stylize are compared."""
    import torch

    prompt = s.workflow("interop_ipadapter_plus_style")
    loader, stylize = node_of(prompt, "IPAdapterModelLoader"), node_of(prompt, "STDStylize")
    ref = node_of(prompt, "STDStyleReference")
    prompt[stylize]["inputs"].update(nfe=2, cfg=1.0)

    def with_latent(p, tag):
        p = json.loads(json.dumps(p))
        p["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [stylize, 0], "filename_prefix": f"lat/{tag}"}}
        return p

    ours = json.loads(json.dumps(prompt))
    ours[loader]["class_type"] = "STDIPAdapterLoader"  # same input name, ipadapter_file
    plain = link_to(prompt, stylize, "model", prompt[ref]["inputs"]["model"])
    runs = {"ipa_plus": s.run(with_latent(prompt, "ipa")), "ours": s.run(with_latent(ours, "ours")),
            "no_reference": s.run(with_latent(plain, "plain"))}
    out = {"runs": runs}
    if all(r["success"] for r in runs.values()):
        lat = {k: load_latent(s.saved(r, "90", "latents")[0]) for k, r in runs.items()}
        images = {k: s.saved(r, node_of(prompt, "SaveImage"), "images")[0] for k, r in runs.items()}
        from PIL import Image
        import numpy as np

        pixels = {k: np.asarray(Image.open(p)) for k, p in images.items()}
        out.update(latents_equal=bool(torch.equal(lat["ipa_plus"], lat["ours"])),
                   latents_max_abs_diff=max_abs(lat["ipa_plus"], lat["ours"]),
                   images_equal=bool(np.array_equal(pixels["ipa_plus"], pixels["ours"])),
                   reference_effect=max_abs(lat["ipa_plus"], lat["no_reference"]),
                   text=[t for t in runs["ipa_plus"]["outputs"].get(ref, {}).get("text", [])])
    # the payloads themselves
    theirs = call(s.M, "IPAdapterModelLoader", ipadapter_file=s.files["ipadapter"])[0]
    mine = call(s.M, "STDIPAdapterLoader", ipadapter_file=s.files["ipadapter"])[0]
    out["payload"] = {
        "top_keys": [sorted(theirs), sorted(mine)],
        "section_keys_equal": {sec: sorted(theirs.get(sec, {})) == sorted(mine.get(sec, {}))
                               for sec in ("image_proj", "ip_adapter")},
        "tensors_equal": all(torch.equal(theirs[sec][k], mine[sec][k]) for sec in ("image_proj", "ip_adapter")
                             for k in mine[sec]),
        "tensor_count": sum(len(mine[sec]) for sec in ("image_proj", "ip_adapter"))}
    return out


@scenario
def ipadapter_plus_unsupported_files(s: Session) -> dict:
    """IPA+'s loader reads IP-Adapter Plus (resampler) and FaceID files too; fed to STD Style Reference through the
    executor they must be refused with a message (not a traceback), before anything is sampled."""
    import torch
    from safetensors.torch import save_file

    folder = s.base / "models" / "ipadapter"
    plus = {"image_proj.latents": torch.zeros(1, 4, 64), "image_proj.proj_in.weight": torch.zeros(64, 32),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768), "ip_adapter.1.to_v_ip.weight": torch.zeros(320, 768)}
    faceid = {"image_proj.proj.0.weight": torch.zeros(64, 32), "image_proj.norm.weight": torch.zeros(768),
              "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768),
              "ip_adapter.1.to_v_ip.weight": torch.zeros(320, 768),
              "ip_adapter.1.to_q_lora.down.weight": torch.zeros(4, 320)}
    save_file(plus, str(folder / "tiny_plus.safetensors"))
    save_file(faceid, str(folder / "tiny_faceid.safetensors"))
    out = {}
    for name in ("tiny_plus.safetensors", "tiny_faceid.safetensors"):
        prompt = s.workflow("interop_ipadapter_plus_style")
        prompt[node_of(prompt, "IPAdapterModelLoader")]["inputs"]["ipadapter_file"] = name
        run = s.run(prompt)
        out[name] = {"success": run["success"], "errors": run["errors"],
                     "sampled": bool(run["progress"].get(node_of(prompt, "STDStylize")))}
    return out


def _ade_prompt(s: Session, clip: str, frames: int, *, ade: bool = True, beta: str = "use existing", tag: str = ""):
    prompt = s.workflow("interop_animatediff_video")
    for node in prompt.values():
        if node["class_type"] == "ADE_LoadAnimateDiffModel":
            node["inputs"]["model_name"] = s.files["motion_module"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = s.files["sd15_layout"]
        if node["class_type"] == "STDLoraLoader":
            node["inputs"]["lora_name"] = s.files["sd15_layout_lora"]
    load, stylize = node_of(prompt, "STDLoadVideo"), node_of(prompt, "STDStylizeVideo")
    use = node_of(prompt, "ADE_UseEvolvedSampling")
    prompt[load]["inputs"].update(video=clip, frame_load_cap=frames, force_rate=0.0)
    prompt[stylize]["inputs"].update(nfe=1, cfg=1.0)  # one UNet call: the SD1.5-layout UNet is the slow part
    prompt[use]["inputs"]["beta_schedule"] = beta
    if not ade:  # the same graph with STD Stylize Video fed by what ADE's node was fed
        prompt[stylize]["inputs"]["model"] = prompt[use]["inputs"]["model"]
        for nid in [k for k, v in prompt.items() if v["class_type"].startswith("ADE_")]:
            del prompt[nid]
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [stylize, 0], "filename_prefix": f"lat/{tag}"}}
    save = node_of(prompt, "STDSaveVideo")
    prompt[save]["inputs"]["filename_prefix"] = f"STD/ade_{tag}"
    return prompt, stylize


def prepare_ade_files(s: Session) -> dict:
    """The SD1.5-layout checkpoint, an STD LoRA for it, the motion module and two lossless 3-frame clips that
    differ only in their last frame (built once, on first use)."""
    import numpy as np

    if "ade" in s.built:
        return s.built["ade"]
    t0 = time.perf_counter()
    models = s.base / "models"
    ckpt = build_sd15_layout(models / "checkpoints" / "sd15_layout.safetensors", Path(s.files["tiny_ckpt_path"]))
    unet = sd15_layout_unet_meta()
    stand_in = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(unet_config=SD15_LAYOUT_UNET),
                                                     diffusion_model=unet))
    lora = models / "loras" / "sd15_layout_std_eta0.75.safetensors"
    layers = comfy_host.write_peft_lora(stand_in, lora, metadata={"std.start_strength": "0.75"})
    mm, tensors = write_motion_module(models / "animatediff_models" / "tiny_mm_sd15_v3.safetensors")
    s.files.update(sd15_layout=ckpt.name, sd15_layout_lora=lora.name, motion_module=mm.name)
    a = moving_square(3, seed=7)
    b = a.copy()
    b[2] = 255 - b[2]
    write_clip(s.input / "interop_ade_a.mp4", a, Fraction(8), lossless=True)
    write_clip(s.input / "interop_ade_b.mp4", b, Fraction(8), lossless=True)
    s.built["ade"] = {
        "build_s": round(time.perf_counter() - t0, 1), "lora_layers": layers, "motion_module_tensors": tensors,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "sizes_mb": {p.name: round(p.stat().st_size / 2 ** 20) for p in (ckpt, mm)},
        "lossless_first_frames_equal": bool(np.array_equal(
            probe(s.input / "interop_ade_a.mp4")[1][:2], probe(s.input / "interop_ade_b.mp4")[1][:2]))}
    return s.built["ade"]


@scenario
def ade_schedules(s: Session) -> dict:
    """ADE's Use Evolved Sampling with each beta_schedule on the tiny SD1.5 model (direct node calls, no
    sampling): the model_sampling it leaves, whether it equals the checkpoint's own schedule, and what STD Schedule
    does with it. Also what 'autoselect' picks for this SD1.5 AnimateDiff module."""
    import torch

    import comfy.model_base

    files = prepare_ade_files(s)
    model = s.tiny_models()[0]
    own = comfy.model_base.model_sampling(model.model.model_config, model.model.model_type).sigmas.float()
    motion = call(s.M, "ADE_LoadAnimateDiffModel", model_name=s.files["motion_module"])[0]
    m_models = call(s.M, "ADE_ApplyAnimateDiffModelSimple", motion_model=motion)[0]
    plain = call(s.M, "STDSchedule", model=model, nfe=3, start_strength=0.75)[0]
    out = {"files": files, "autoselect_pick": motion.model.get_best_beta_schedule(),
           "motion_info": motion.model.mm_info.get_string(),
           "plain_sigmas": plain.tolist(), "betas": {}}
    for beta in ("use existing", "autoselect", "sqrt_linear (AnimateDiff)", "linear (AnimateDiff-SDXL)",
                 "linear (HotshotXL/default)"):
        patched = call(s.M, "ADE_UseEvolvedSampling", model=model, beta_schedule=beta, m_models=m_models)[0]
        ms = patched.get_model_object("model_sampling")
        entry = {"model_sampling": type(ms).__name__, "steps": len(ms.sigmas),
                 "equals_own": bool(ms.sigmas.shape == own.shape and torch.allclose(ms.sigmas.float(), own, rtol=1e-4,
                                                                                   atol=1e-6)),
                 "max_rel_diff": float(((ms.sigmas.float() - own) / own).abs().max()) if ms.sigmas.shape == own.shape
                 else None}
        try:
            entry["std_sigmas"] = call(s.M, "STDSchedule", model=patched, nfe=3, start_strength=0.75)[0].tolist()
        except ValueError as err:
            entry["std_error"] = str(err)
        out["betas"][beta] = entry
    return out


@scenario
def ade_motion(s: Session) -> dict:
    """interop_animatediff_video on the SD1.5-layout checkpoint (3 frames, NFE 1) with and without ADE, on two clips
    that differ only in frame 2; then beta schedules that replace the model's schedule, through the executor."""
    out = {"files": prepare_ade_files(s)}
    runs, lat, texts = {}, {}, {}
    for tag, clip, ade in (("plain_a", "interop_ade_a.mp4", False), ("ade_a", "interop_ade_a.mp4", True),
                           ("plain_b", "interop_ade_b.mp4", False), ("ade_b", "interop_ade_b.mp4", True)):
        t0 = time.perf_counter()
        prompt, stylize = _ade_prompt(s, clip, 3, ade=ade, tag=tag)
        run = runs[tag] = s.run(prompt)
        run["seconds"] = round(time.perf_counter() - t0, 1)
        if run["success"]:
            lat[tag] = load_latent(s.saved(run, "90", "latents")[0])
            texts[tag] = run["outputs"].get(stylize, {}).get("text", [])
            run["saved"] = [probe(p)[0] for p in s.saved(run, node_of(prompt, "STDSaveVideo"), "images")]
    out["runs"] = runs
    if len(lat) == 4:
        out.update(
            shape=list(lat["ade_a"].shape), texts=texts,
            ade_effect=max_abs(lat["ade_a"], lat["plain_a"]),
            scale=float(lat["plain_a"].abs().max()),
            # frame 2's input changed: with the motion module frame 0's output follows, without it it must not
            ade_frame0_change=max_abs(lat["ade_a"][0], lat["ade_b"][0]),
            plain_frame0_change=max_abs(lat["plain_a"][0], lat["plain_b"][0]),
            plain_frame2_change=max_abs(lat["plain_a"][2], lat["plain_b"][2]))
    refusals = {}
    for beta in ("sqrt_linear (AnimateDiff)", "autoselect", "linear (AnimateDiff-SDXL)"):
        prompt, stylize = _ade_prompt(s, "interop_ade_a.mp4", 3, beta=beta, tag="refused")
        run = s.run(prompt)
        refusals[beta] = {"success": run["success"], "errors": run["errors"],
                          "sampled": bool(run["progress"].get(stylize))}
    out["refusals"] = refusals
    return out


# ---------------------------------------------------------------------------------------------------------------


def run_all(base: Path, peers: Path, only: list[str] | None = None) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    sys.pycache_prefix = str(base / "pycache")  # before the first ComfyUI import: no bytecode in the trees
    trees = {"comfyui": comfy_host.tree_snapshot(), "peers": comfy_host.tree_snapshot(str(peers))}
    t0 = time.perf_counter()
    import diffusers  # noqa: F401  (before the torchvision stub, as comfy_host.boot does)
    import transformers  # noqa: F401
    sys.path.insert(0, comfy_host.comfyui_path())
    comfy_host._stub_torchvision()
    from comfy.cli_args import args

    args.fp16_unet = True  # see the module docstring: fp16 storage, fp32 compute on CPU
    host = comfy_host.boot_with_peers(base, peers)
    results = {"boot_s": round(time.perf_counter() - t0, 1), "loaded": {"comfyui-std": bool(host.loaded),
                                                                          **host.peers},
               "peer_versions": peer_versions(peers), "scenarios": {}, "timings": {}}
    s = Session(host, base)
    t = time.perf_counter()
    prepare_files(s)
    results["timings"]["prepare_files"] = round(time.perf_counter() - t, 1)
    for name, fn in SCENARIOS.items():
        if only and name not in only:
            continue
        if name.startswith("ade_motion"):
            s.release()
        t = time.perf_counter()
        try:
            results["scenarios"][name] = {"ok": True, **fn(s)}
        except Exception:  # recorded for the test that owns the scenario; the other scenarios still run
            results["scenarios"][name] = {"ok": False, "error": traceback.format_exc()}
        results["timings"][name] = round(time.perf_counter() - t, 1)
    for big in ("sd15_layout", "motion_module"):  # ~2 GB of random weights: not left behind in the temp folder
        for folder in ("checkpoints", "animatediff_models"):
            p = base / "models" / folder / s.files.get(big, "-")
            if p.is_file():
                p.unlink()
    results["tree_changes"] = {"comfyui": comfy_host.tree_changes(trees["comfyui"]),
                               "peers": _changes(trees["peers"], comfy_host.tree_snapshot(str(peers)))}
    results["total_s"] = round(time.perf_counter() - t0, 1)
    try:
        import resource

        results["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    except ImportError:
        pass
    return results


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="temporary folder for models, input and output")
    parser.add_argument("--results", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--peers", type=Path, default=None,
                        help=f"peer packs folder (default: ${comfy_host.PEERS_ENV} or shared/peers beside the repository)")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(SCENARIOS), help="run these scenarios")
    a = parser.parse_args(argv)
    peers = a.peers or comfy_host.peers_path()
    if not comfy_host.comfyui_path():
        parser.error("COMFYUI_PATH must point at a ComfyUI checkout")
    missing = comfy_host.missing_peers(peers)
    if missing:
        parser.error(f"peer packs not found in {peers}: {', '.join(missing)}")
    results = run_all(a.base, peers, a.only)
    a.results.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
