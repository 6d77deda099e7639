"""STD Motion LoRA with AnimateDiff-Evolved, against its real code, and the same v2v LoRA on the diffusers path.

ComfyUI boots here with this pack and the peer packs (as ``tools/peers_host.py`` boots them, in a process of its own
because AnimateDiff-Evolved changes global state), runs the scenarios and writes what it measured to a JSON file;
the assertions live in ``tests/test_interop_motion_lora.py``, which runs this module once per test session::

    python tools/motion_lora_host.py --base DIR --results results.json [--peers DIR] [--only SCENARIO ...]

Test files (random weights, written under the base folder and deleted at the end):

* an **SDXL-layout checkpoint**: AnimateDiff-Evolved builds SDXL motion modules at SDXL's widths (320, 640, 1280) and
  injects one after every UNet block holding a ResBlock or a transformer, and refuses an SDXL module on a model that
  ComfyUI did not detect as SDXL. The smallest UNet ComfyUI detects as an SDXL-family model is Segmind Vega's
  layout (transformer depth 0, 0, 1, 1, 2, 2 in the input blocks; none in the middle and output blocks here), and
  its text encoders are SDXL's two CLIPs at full size (ComfyUI builds them from fixed configs): CLIP-L is the tiny
  checkpoint's (random), CLIP-G zeros, so the conditioning is CLIP-L's hidden states beside zeros.
* an **SDXL motion module** in the AnimateDiff-SDXL and the Hotshot-XL file layouts, written with
  ``core/motion_format.from_diffusers`` from the same random diffusers ``MotionAdapter`` weights at SDXL's widths
  (Hotshot-XL's positional tables cut to its 24 frames), and an
  **SDXL v2v LoRA**: PEFT image layers for that UNet plus PEFT motion layers (``unet.down_blocks.0.motion_modules.0.
  transformer_blocks.0.attn1.to_q.lora_A.weight`` ...) on every linear layer of the motion modules, with its alpha
  in the ``std.alpha`` header (alpha 8 at rank 4).
* an **SD1.5 checkpoint both implementations read**: SD1.5's widths and block layout with transformers in the first
  level and the middle block only (the diffusers block types CrossAttnDown, Down, Down, Down), an AnimateDiff v3
  SD1.5 module and an SD1.5 v2v LoRA made the same way, for the comparison with ``std_hf.motion``.

Weights are loaded in fp32 (ComfyUI's ``--fp32-text-enc`` for the text encoders too): on CPU that is faster than
fp16 storage, which ComfyUI casts to fp32 layer by layer on every call, and LoRA deltas are added in fp32, as on the
diffusers side of the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: python tools/motion_lora_host.py
    sys.path.insert(0, str(REPO))

from tools import comfy_host, peers_host  # noqa: E402
from tools.peers_host import Session, call, load_latent, max_abs, node_of, probe  # noqa: E402

WORKFLOW = "interop_animatediff_motion_lora"
NODE = "STDMotionLoraLoader"
LORA_RANK, LORA_ALPHA = 4, 8.0

#: the smallest UNet ComfyUI detects as an SDXL-family model (Segmind Vega's transformer depths) with SDXL's block
#: layout: three levels at 320/640/1280 with two res blocks each, what AnimateDiff-Evolved's SDXL injection needs
SDXL_LAYOUT_UNET = dict(comfy_host.TINY_UNET, context_dim=2048, num_heads=-1, num_head_channels=64,
                        use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                        channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                        transformer_depth_output=[0] * 9, transformer_depth_middle=-1)
#: SD1.5's widths and block layout with transformers in level 0 (input and output) and the middle block: ComfyUI
#: detects it as SD1.5, and it is a diffusers UNet2DConditionModel (CrossAttnDown, Down, Down, Down) too
SD15_SHARED_UNET = dict(comfy_host.TINY_UNET, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                        transformer_depth=[1, 1, 0, 0, 0, 0, 0, 0], transformer_depth_output=[1, 1, 1] + [0] * 9,
                        transformer_depth_middle=1)
SDXL_WIDTHS, SD15_WIDTHS = (320, 640, 1280), (320, 640, 1280, 1280)


# ---------------------------------------------------------------------------------------------------------------
# Test files


def unet_meta(config: dict):
    """A ComfyUI UNetModel of ``config`` on the meta device (shapes only)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(**config, operations=comfy.ops.disable_weight_init)


def sdxl_clip_tensors(tiny: dict) -> dict:
    """SDXL's two text encoders in the checkpoint layout: CLIP-L from the tiny checkpoint, CLIP-G zeros (fp16)."""
    import comfy.sdxl_clip
    import comfy.supported_models
    import torch

    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    config = comfy.supported_models.SDXL(dict(SDXL_LAYOUT_UNET, transformer_depth=[0, 0, 2, 2, 10, 10]))
    layout = config.process_clip_state_dict_for_saving(dict(clip.state_dict()))
    out = {}
    for key, value in layout.items():
        own = key.replace("conditioner.embedders.0.transformer.", "cond_stage_model.transformer.", 1)
        if key.startswith("conditioner.embedders.0.") and own in tiny:
            out[key] = tiny[own]
        elif value.is_floating_point():
            out[key] = torch.zeros(value.shape, dtype=torch.float16)
        else:
            out[key] = value.to("cpu") if value.device.type != "meta" else torch.zeros(value.shape, dtype=value.dtype)
    return out


class RandomWeights:
    """Random fp16 tensors, fast: slices at random offsets of one pool of N(0, 1) values (drawing every weight anew
    costs more than everything the tests do with these files). Deterministic for a seed."""

    POOL = 1 << 26  # larger than any test tensor (SD1.5's largest UNet convolution has 29.5M weights)

    def __init__(self, seed: int):
        import torch

        self.g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(self.POOL, generator=self.g).half()

    def normal(self, shape, std: float):
        import torch

        n = math.prod(shape)
        start = int(torch.randint(0, self.POOL - n + 1, (1,), generator=self.g))
        return (self.pool[start:start + n] * std).reshape(shape)

    def like_layer(self, name: str, shape, std: float):
        """Norm weights 1, biases 0, other weights N(0, std²) (what peers_host's checkpoint writer draws)."""
        import torch

        if "norm" in name and name.endswith("weight"):
            return torch.ones(shape, dtype=torch.float16)
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=torch.float16)
        return self.normal(shape, std)


def build_checkpoint(path: Path, config: dict, tiny_ckpt: Path, sdxl: bool, seed: int) -> tuple[Path, int]:
    """A single-file checkpoint with a random fp16 UNet of ``config`` and the tiny checkpoint's TAESD, and its CLIP-L
    (SD1.5), or SDXL's two text encoders (:func:`sdxl_clip_tensors`). Returns (path, UNet parameters)."""
    from safetensors.torch import load_file, save_file

    tiny = {k: v for k, v in load_file(str(tiny_ckpt)).items() if not k.startswith("model.diffusion_model.")}
    sd = {k: v for k, v in tiny.items() if k.startswith("first_stage_model.")}
    sd.update(sdxl_clip_tensors(tiny) if sdxl else {k: v for k, v in tiny.items()
                                                       if k.startswith("cond_stage_model.")})
    rand, params = RandomWeights(seed), 0
    for k, v in unet_meta(config).state_dict().items():
        sd[f"model.diffusion_model.{k}"] = rand.like_layer(k, tuple(v.shape), 0.02)
        params += v.numel()
    save_file(sd, str(path))
    return path, params


def random_adapter(widths: tuple, max_frames: int, seed: int) -> dict:
    """The state dict of a random diffusers MotionAdapter (AnimateDiff's structure: two motion modules per down block,
    three per up block, 8 heads, 32 groups, no mid block) at ``widths``, fp16: weights N(0, 1/fan_in), norms 1,
    biases 0, positional tables N(0, 0.5)."""
    import torch
    from diffusers import MotionAdapter

    with torch.device("meta"):
        adapter = MotionAdapter(block_out_channels=widths, motion_layers_per_block=2, motion_max_seq_length=max_frames,
                                use_motion_mid_block=False, motion_num_attention_heads=8, motion_norm_num_groups=32)
    rand = RandomWeights(seed)
    out = {}
    for k, v in adapter.state_dict().items():
        shape = tuple(v.shape)
        out[k] = rand.normal(shape, 0.5) if k.endswith("pos_embed.pe") else \
            rand.like_layer(k, shape, 1.0 / math.sqrt(shape[-1]))
    return out


def motion_linears(adapter_sd: dict) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of the linear layers of a diffusers MotionAdapter state dict."""
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in adapter_sd.items()
            if k.endswith(".weight") and v.ndim == 2 and "motion_modules." in k}


def motion_lora_tensors(adapter_sd: dict, seed: int, form: str = "peft", scale: float = 0.1) -> dict:
    """LoRA factors (rank 4) on every linear layer of the motion modules, as a v2v LoRA names them: ``peft``
    (``unet.<path>.lora_A/lora_B.weight``) or ``kohya`` (``lora_unet_<path with _>.lora_down/lora_up.weight`` and an
    ``alpha`` tensor of LORA_ALPHA). The same seed gives the same factors in both forms."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (o, i) in sorted(motion_linears(adapter_sd).items()):
        down = torch.randn(LORA_RANK, i, generator=g) / math.sqrt(i)
        up = torch.randn(o, LORA_RANK, generator=g) * scale / math.sqrt(LORA_RANK)
        if form == "peft":
            out[f"unet.{path}.lora_A.weight"], out[f"unet.{path}.lora_B.weight"] = down.half(), up.half()
        else:
            name = "lora_unet_" + path.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down.half(), up.half()
            out[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def image_lora_tensors(unet_config: dict, seed: int, scale: float = 0.05) -> dict:
    """PEFT LoRA factors (rank 4) on the UNet layers comfy_host.write_peft_lora targets, in sorted layer order, so the
    same seed gives the same file in every process (ComfyUI's diffusers key map is built from sets)."""
    import comfy.utils
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in unet_meta(unet_config).state_dict().items()}
    out = {}
    for dkey, lkey in sorted(comfy.utils.unet_to_diffusers(unet_config).items()):
        if not dkey.endswith(comfy_host.LORA_TARGETS) or lkey not in shapes:
            continue
        w, base = shapes[lkey], "unet." + dkey[: -len(".weight")]
        extra = [1] * (len(w) - 2)
        out[base + ".lora_A.weight"] = (torch.randn(LORA_RANK, w[1], *extra, generator=g) * scale).half()
        out[base + ".lora_B.weight"] = (torch.randn(w[0], LORA_RANK, *extra, generator=g) * scale).half()
    return out


def write_v2v_lora(path: Path, unet_config: dict, adapter_sd: dict, seed: int) -> dict:
    """An STD v2v LoRA: PEFT image layers for the UNet and PEFT motion layers for the motion module, alpha LORA_ALPHA
    in the header. Returns counts."""
    from safetensors.torch import save_file

    meta = {"std.start_strength": "0.75", "std.alpha": str(LORA_ALPHA), "std.rank": str(LORA_RANK)}
    image = image_lora_tensors(unet_config, seed)
    motion = motion_lora_tensors(adapter_sd, seed + 1)
    save_file({**image, **motion}, str(path), metadata=meta)
    return {"image_layers": len(image) // 2, "motion_tensors": len(motion), "motion_layers": len(motion) // 2}


def prepare_files(s: Session) -> dict:
    """Every test file (see the module docstring) and a lossless 3-frame clip."""
    from safetensors.torch import load_file, save_file

    from comfyui_std.core.motion_format import from_diffusers

    t0 = time.perf_counter()
    models = s.base / "models"
    loras, mms = models / "loras", models / "animatediff_models"
    tiny = comfy_host.build_tiny_sd15(models / "checkpoints" / "tiny_sd15.safetensors")
    sdxl, sdxl_params = build_checkpoint(models / "checkpoints" / "sdxl_layout.safetensors", SDXL_LAYOUT_UNET, tiny,
                                         sdxl=True, seed=11)
    sd15, sd15_params = build_checkpoint(models / "checkpoints" / "sd15_shared.safetensors", SD15_SHARED_UNET, tiny,
                                         sdxl=False, seed=12)
    facts = {"unet_parameters": {"sdxl_layout": sdxl_params, "sd15_shared": sd15_params}, "tensors": {},
             "checkpoints_s": round(time.perf_counter() - t0, 1)}
    sdxl_adapter = random_adapter(SDXL_WIDTHS, 32, seed=21)
    # the same SDXL weights in both SDXL layouts, with AnimateDiff-SDXL's 32-frame and Hotshot-XL's 24-frame tables
    hotshot = {k: (v[:, :24].clone() if k.endswith("pos_embed.pe") else v) for k, v in sdxl_adapter.items()}
    adapters = {"animatediff": sdxl_adapter, "hotshotxl": hotshot,
                "sd15": random_adapter(SD15_WIDTHS, 32, seed=23)}  # AnimateDiff v3 SD1.5
    names = {"animatediff": "random_mm_sdxl.safetensors", "hotshotxl": "random_hsxl_temporal_layers.safetensors",
             "sd15": "random_mm_sd15_v3.safetensors"}
    for key, adapter in adapters.items():
        written = from_diffusers(adapter, "hotshotxl" if key == "hotshotxl" else "animatediff")
        save_file(written, str(mms / names[key]))
        facts["tensors"][key] = len(written)
    facts["motion_modules_s"] = round(time.perf_counter() - t0 - facts["checkpoints_s"], 1)
    s.files.update(ckpt=tiny.name, sdxl=sdxl.name, sd15=sd15.name, **{f"mm_{k}": v for k, v in names.items()})
    facts["sdxl_lora"] = write_v2v_lora(loras / "std_sdxl_layout_v2v_eta0.75.safetensors", SDXL_LAYOUT_UNET,
                                        adapters["hotshotxl"], seed=31)
    facts["sd15_lora"] = write_v2v_lora(loras / "std_sd15_shared_v2v_eta0.75.safetensors", SD15_SHARED_UNET,
                                        adapters["sd15"], seed=41)
    v2v = load_file(str(loras / "std_sdxl_layout_v2v_eta0.75.safetensors"))
    # the same motion factors in kohya form (alpha tensors), without image layers
    save_file(motion_lora_tensors(adapters["hotshotxl"], 32, "kohya"), str(loras / "sdxl_motion_kohya.safetensors"))
    # refusals: the SD1.5 module's motion layers (another module), the image part alone, a layer without lora_B
    sd15_v2v = load_file(str(loras / "std_sd15_shared_v2v_eta0.75.safetensors"))
    save_file({k: v for k, v in sd15_v2v.items() if "motion_modules" in k}, str(loras / "sd15_motion.safetensors"))
    save_file({k: v for k, v in v2v.items() if "motion_modules" not in k}, str(loras / "sdxl_image_only.safetensors"))
    dropped = sorted(k for k in v2v if "motion_modules" in k and k.endswith("lora_B.weight"))[0]
    save_file({k: v for k, v in v2v.items() if k != dropped}, str(loras / "sdxl_no_lora_b.safetensors"),
              metadata={"std.alpha": str(LORA_ALPHA)})
    s.files.update(sdxl_lora="std_sdxl_layout_v2v_eta0.75.safetensors",
                   sd15_lora="std_sd15_shared_v2v_eta0.75.safetensors", kohya="sdxl_motion_kohya.safetensors",
                   misfit="sd15_motion.safetensors", image_only="sdxl_image_only.safetensors",
                   no_lora_b="sdxl_no_lora_b.safetensors")
    facts["dropped_lora_b"] = dropped
    peers_host.write_clip(s.input / "motion_lora_clip.mp4", peers_host.moving_square(3, seed=7), Fraction(8),
                          lossless=True)
    facts["build_s"] = round(time.perf_counter() - t0, 1)
    return facts


# ---------------------------------------------------------------------------------------------------------------
# Scenarios

SCENARIOS: dict[str, callable] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def workflow_round_trip(s: Session) -> dict:
    """The example workflow's UI file converts back to its API twin (the frontend's graphToPrompt, with the peers'
    and this pack's node definitions)."""
    from tools.workflow_format import dynamic_form, ui_to_api

    ui = json.loads((peers_host.UI_DIR / f"{WORKFLOW}.json").read_text())
    api = dynamic_form(json.loads((peers_host.API_DIR / f"{WORKFLOW}.json").read_text()), s.host.nodes)
    got = ui_to_api(ui, s.host.nodes)
    return {"equal": got == api, "differences": sorted(k for k in set(got) | set(api) if got.get(k) != api.get(k)),
            "class_types": sorted(n["class_type"] for n in api.values())}


def workflow_prompt(s: Session, layout: str, tag: str, **node_inputs) -> tuple[dict, dict]:
    """The example workflow with the SDXL-layout test files and a short CPU run (3 frames, NFE 1, cfg 1), the
    latents saved after STD Stylize Video; ``node_inputs`` override STD Motion LoRA's inputs (``bypass=True``: the
    motion model goes to Apply AnimateDiff Model directly)."""
    prompt = json.loads((peers_host.API_DIR / f"{WORKFLOW}.json").read_text())
    ids = {name: node_of(prompt, name) for name in ("CheckpointLoaderSimple", "STDLoraLoader", NODE, "STDLoadVideo",
                                                    "ADE_LoadAnimateDiffModel", "ADE_ApplyAnimateDiffModelSimple",
                                                    "STDStylizeVideo", "STDSaveVideo")}
    prompt[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = s.files["sdxl"]
    prompt[ids["STDLoraLoader"]]["inputs"]["lora_name"] = s.files["sdxl_lora"]
    prompt[ids["ADE_LoadAnimateDiffModel"]]["inputs"]["model_name"] = s.files[f"mm_{layout}"]
    prompt[ids[NODE]]["inputs"]["lora_name"] = s.files["sdxl_lora"]
    prompt[ids["STDLoadVideo"]]["inputs"].update(video="motion_lora_clip.mp4", frame_load_cap=3, force_rate=0.0)
    stylize = prompt[ids["STDStylizeVideo"]]["inputs"]
    stylize.update(nfe=1, cfg=1.0, negative=stylize["positive"])  # one UNet call per run, one text encoding
    prompt[ids["STDSaveVideo"]]["inputs"]["filename_prefix"] = f"STD/motion_lora_{tag}"
    if node_inputs.pop("bypass", False):
        prompt[ids["ADE_ApplyAnimateDiffModelSimple"]]["inputs"]["motion_model"] = [ids["ADE_LoadAnimateDiffModel"], 0]
        del prompt[ids[NODE]]
    else:
        prompt[ids[NODE]]["inputs"].update(node_inputs)
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [ids["STDStylizeVideo"], 0],
                                                           "filename_prefix": f"lat/{tag}"}}
    return prompt, ids


class LogMessages(logging.Handler):
    """The messages a logger emits from now until :meth:`stop` (warnings and up)."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def stop(self) -> list[str]:
        self.logger.removeHandler(self)
        super().close()
        return self.messages


def _run(s: Session, layout: str, tag: str, **node_inputs) -> tuple[dict, object]:
    t0 = time.perf_counter()
    prompt, ids = workflow_prompt(s, layout, tag, **node_inputs)
    run = s.run(prompt)
    run["seconds"] = round(time.perf_counter() - t0, 1)
    run["node_text"] = run["outputs"].get(ids[NODE], {}).get("text", [])
    run["sampled"] = bool(run["progress"].get(ids["STDStylizeVideo"]))
    latent = None
    if run["success"]:
        latent = load_latent(s.saved(run, "90", "latents")[0])
        run["saved"] = [probe(p)[0] for p in s.saved(run, ids["STDSaveVideo"], "images")]
        run["stylize_text"] = run["outputs"].get(ids["STDStylizeVideo"], {}).get("text", [])
    return run, latent


def _sdxl(s: Session, layout: str) -> dict:
    """The example workflow on the SDXL-layout checkpoint with a random ``layout`` module, run with the v2v LoRA
    (strength 1 and 0) and without STD Motion LoRA; then STD Motion LoRA given files that do not fit, and (Hotshot-XL)
    the patches it makes of the LoRA's motion factors in kohya form."""
    runs, lat = {}, {}
    messages = LogMessages("comfyui_std")
    for tag, inputs in (("plain", {"bypass": True}), ("lora", {}), ("strength0", {"strength": 0.0})):
        runs[tag], lat[tag] = _run(s, layout, f"{layout}_{tag}", **inputs)
    out = {"runs": runs}
    if all(v is not None for v in lat.values()):
        out.update(shape=list(lat["lora"].shape), scale=float(lat["plain"].abs().max()),
                   latents={k: lat[k].tolist() for k in ("plain", "lora")},
                   lora_effect=max_abs(lat["lora"], lat["plain"]),
                   strength0_vs_plain=max_abs(lat["strength0"], lat["plain"]))
    motion = call(s.M, "ADE_LoadAnimateDiffModel", model_name=s.files[f"mm_{layout}"])[0]
    out["mm_info"] = motion.model.mm_info.get_string()
    if layout == "hotshotxl":  # the same motion factors in kohya form: the node's patches, compared directly
        out["kohya"] = compare_patches(s, motion, s.files["sdxl_lora"], s.files["kohya"])
    refusals = {}
    for tag in ("misfit", "image_only", "no_lora_b", "missing"):
        run, _ = _run(s, layout, f"{layout}_{tag}", lora_name=s.files.get(tag, "nope.safetensors"))
        refusals[tag] = {k: run[k] for k in ("valid", "success", "errors", "sampled")}
    out["refusals"] = refusals
    out["log"] = messages.stop()
    return out


def compare_patches(s: Session, motion, name_a: str, name_b: str) -> dict:
    """STD Motion LoRA run directly on one motion model with two files: the weight keys it patches and the largest
    difference between their patches (weight differences), with each run's report."""
    runs = [s.M[NODE].execute(motion, name, 1.0) for name in (name_a, name_b)]
    patches = [run.result[0].patches for run in runs]
    keys = sorted(set(patches[0]) | set(patches[1]))
    diff = 0.0
    for key in keys:
        if key in patches[0] and key in patches[1]:
            (sa, (da,), *_), (sb, (db,), *_) = patches[0][key][-1], patches[1][key][-1]
            diff = max(diff, float((sa * da.double() - sb * db.double()).abs().max()))
    return {"texts": [run.ui["text"] for run in runs], "same_keys": set(patches[0]) == set(patches[1]),
            "keys": len(keys), "max_abs_diff": diff, "unpatched": bool(not motion.patches),
            "added_to_input": any(len(v) > 1 for p in patches for v in p.values())}


@scenario
def sdxl_hotshotxl(s: Session) -> dict:
    return _sdxl(s, "hotshotxl")


@scenario
def sdxl_animatediff(s: Session) -> dict:
    return _sdxl(s, "animatediff")


def _rel(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def frame_norms(model, per_frame: int) -> int:
    """Make the input GroupNorm of every motion module of a diffusers UNetMotionModel normalise each frame on its own
    (as AnimateDiff-Evolved does) for the first ``per_frame`` clips of a batch, and over all frames of the clip
    together (diffusers' own behaviour) for the others. Returns the number of motion modules."""
    import torch
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    class FrameNorm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.inner, self.per_frame = norm, 0

        def forward(self, x):  # [clips, channels, frames, H, W]
            b, c, f, h, w = x.shape
            k = min(self.per_frame, b)
            parts = []
            if k:
                y = self.inner(x[:k].permute(0, 2, 1, 3, 4).reshape(k * f, c, h, w))
                parts.append(y.reshape(k, f, c, h, w).permute(0, 2, 1, 3, 4))
            if k < b:
                parts.append(self.inner(x[k:]))
            return torch.cat(parts)

    count = 0
    for module in model.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            if type(module.norm).__name__ != "FrameNorm":  # wrapped once; later calls set the split only
                module.norm = FrameNorm(module.norm)
            module.norm.per_frame = per_frame
            count += 1
    return count


@scenario
def sd15_diffusers_equality(s: Session) -> dict:
    """One UNet call on the same noisy latents (4 frames of different brightness), timestep 499 and conditioning:
    ComfyUI + AnimateDiff-Evolved (STD LoRA Loader, Load AnimateDiff Model, STD Motion LoRA, Apply, Use Evolved
    Sampling, SamplerCustom with euler from σ(499) to 0, which returns the model's x0) against diffusers (std_hf's
    single-file loader, the image layers merged, std_hf.motion's MotionAdapter + UNetMotionModel + FusedMotionLora),
    everything in fp32. diffusers is compared with its motion modules' GroupNorm per frame (as AnimateDiff-Evolved
    normalises) and as it ships (over all frames)."""
    import comfy.model_management
    import torch
    from diffusers.models.modeling_utils import no_init_weights

    from std_hf.base import load_base
    from std_hf.lora import lora_layers, merge_layers, read_lora
    from std_hf.motion import FusedMotionLora, load_motion_adapter, motion_lora, motion_unet

    models = s.base / "models"
    out, t0 = {}, time.perf_counter()
    seconds = out["seconds"] = {}
    with torch.inference_mode():
        model, clip, _ = call(s.M, "CheckpointLoaderSimple", ckpt_name=s.files["sd15"])[:3]
        out["comfy_unet_dtype"] = str(model.model.get_dtype())
        patched = call(s.M, "STDLoraLoader", model=model, lora_name=s.files["sd15_lora"], strength=1.0)[0]
        cond = call(s.M, "CLIPTextEncode", clip=clip, text="a painting of a moving square")[0]
        seconds["comfy_load"] = round(time.perf_counter() - t0, 1)
        motion = call(s.M, "ADE_LoadAnimateDiffModel", model_name=s.files["mm_sd15"])[0]
        out["mm_info"] = motion.model.mm_info.get_string()
        applied = s.M[NODE].execute(motion, s.files["sd15_lora"], 1.0)
        out["node_text"] = applied.ui["text"]
        m_models = call(s.M, "ADE_ApplyAnimateDiffModelSimple", motion_model=applied.result[0])[0]
        ade = call(s.M, "ADE_UseEvolvedSampling", model=patched, m_models=m_models, beta_schedule="use existing")[0]
        ms = ade.get_model_object("model_sampling")
        sigma = float(ms.sigma(torch.tensor(499.0)))
        out["timestep"] = float(ms.timestep(torch.tensor(sigma)))
        g = torch.Generator().manual_seed(5)
        frames = 4
        latent = torch.randn(frames, 4, 8, 8, generator=g) * torch.linspace(0.5, 2.0, frames).view(-1, 1, 1, 1) \
            + torch.linspace(-1.0, 1.0, frames).view(-1, 1, 1, 1)
        sampler = call(s.M, "KSamplerSelect", sampler_name="euler")[0]
        seconds["comfy_prepare"] = round(time.perf_counter() - t0, 1)
        result = call(s.M, "SamplerCustom", model=ade, add_noise=False, noise_seed=0, cfg=1.0, positive=cond,
                      negative=cond, sampler=sampler, sigmas=torch.tensor([sigma, 0.0]),
                      latent_image={"samples": latent})
        fmt = model.model.latent_format
        x = fmt.process_in(latent)
        eps_comfy = (x - fmt.process_in(result[1]["samples"].float())) / sigma
        context = cond[0][0].float()
    del model, clip, patched, motion, applied, m_models, ade, result, sampler
    s.release()
    comfy.model_management.soft_empty_cache()
    seconds["comfy"] = round(time.perf_counter() - t0, 1)

    lora_sd, lora_meta = read_lora(models / "loras" / s.files["sd15_lora"])
    base = load_base(str(models / "checkpoints" / s.files["sd15"]))
    seconds["diffusers_load"] = round(time.perf_counter() - t0, 1)
    image = lora_layers(base.unet, [], lora_sd, lora_meta, "lora", motion_ok=True)
    merge_layers({"unet": base.unet}, image)
    module = load_motion_adapter(str(models / "animatediff_models" / s.files["mm_sd15"]))
    with no_init_weights():  # every weight is copied from the UNet and the adapter; no random init first
        unet = motion_unet(base.unet, module).eval()
    del base
    motion_sd = {k: v for k, v in lora_sd.items() if "motion_modules" in k}
    layers = motion_lora(unet, motion_sd, lora_meta, s.files["sd15_lora"], module.info.label())
    fused = FusedMotionLora(unet, layers, 1.0)
    seconds["diffusers_prepare"] = round(time.perf_counter() - t0, 1)

    def eps_diffusers(clips: int):
        """diffusers' eps for ``clips`` copies of the clip (one timestep, the text states per frame)."""
        sample = (x / math.sqrt(sigma ** 2 + 1)).permute(1, 0, 2, 3)[None].repeat(clips, 1, 1, 1, 1)
        with torch.inference_mode():
            eps = unet(sample, torch.tensor(499.0), encoder_hidden_states=context.repeat(clips * frames, 1, 1)).sample
        return eps.permute(0, 2, 1, 3, 4)  # [clips, frames, C, H, W]

    # one call, two clips: the first normalised per frame (as AnimateDiff-Evolved), the second as diffusers ships
    out["norms_switched"] = frame_norms(unet, 1)
    eps_per_frame, eps_across = eps_diffusers(2)
    seconds["diffusers_call"] = round(time.perf_counter() - t0, 1)
    out.update(
        module_line=module.line(), image_layers=len(image), motion_layers=len(layers), fused_layers=fused.count,
        rel_per_frame=_rel(eps_comfy, eps_per_frame), rel_across_frames=_rel(eps_comfy, eps_across),
        eps_norm=float(eps_comfy.norm()),
        finite=bool(torch.isfinite(eps_comfy).all() and torch.isfinite(eps_per_frame).all()))
    seconds["total"] = round(time.perf_counter() - t0, 1)
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

    args.fp32_text_enc = True  # see the module docstring: fp32 weights
    host = comfy_host.boot_with_peers(base, peers)
    results = {"boot_s": round(time.perf_counter() - t0, 1),
               "loaded": {"comfyui-std": bool(host.loaded), **host.peers}, "scenarios": {}, "timings": {}}
    s = Session(host, base)
    results["cpu_timings"] = {"boot": round(time.process_time(), 1)}
    t, c = time.perf_counter(), time.process_time()
    try:
        results["files"] = prepare_files(s)
    except Exception:
        results["files_error"] = traceback.format_exc()
    results["timings"]["prepare_files"] = round(time.perf_counter() - t, 1)
    results["cpu_timings"]["prepare_files"] = round(time.process_time() - c, 1)
    for name, fn in SCENARIOS.items():
        if (only and name not in only) or "files_error" in results:
            continue
        if name == "sd15_diffusers_equality":  # the SDXL models are done with; the SD1.5 ones are as large
            s.release()
        t, c = time.perf_counter(), time.process_time()
        try:
            results["scenarios"][name] = {"ok": True, **fn(s)}
        except Exception:  # recorded for the test that owns the scenario; the other scenarios still run
            results["scenarios"][name] = {"ok": False, "error": traceback.format_exc()}
        results["timings"][name] = round(time.perf_counter() - t, 1)
        results["cpu_timings"][name] = round(time.process_time() - c, 1)
    for folder in ("checkpoints", "animatediff_models", "loras"):  # GBs of random weights: not left behind
        for p in (base / "models" / folder).glob("*.safetensors"):
            p.unlink()
    results["tree_changes"] = {"comfyui": comfy_host.tree_changes(trees["comfyui"]),
                               "peers": peers_host._changes(trees["peers"], comfy_host.tree_snapshot(str(peers)))}
    results["total_s"] = round(time.perf_counter() - t0, 1)
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        results["max_rss_gb"] = round(usage.ru_maxrss / 2 ** 20, 2)
        results["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    except ImportError:
        pass
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="temporary folder for models, input and output")
    parser.add_argument("--results", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--peers", type=Path, default=None,
                        help=f"peer packs folder (default: ${comfy_host.PEERS_ENV} or shared/peers beside the "
                             "repository)")
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
