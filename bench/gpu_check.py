"""One GPU check at real SDXL size, random weights built on the GPU, no downloads: one ``name: value`` line per figure.

Sections (``--only`` picks some):

* ``vae``: the SDXL VAE in fp32 and bf16, one 1024² frame and a 16-frame 1024x576 block through the project's codec
  in the sub-batches of the memory plan (``std_hf.memory``): seconds and ``torch.cuda.max_memory_allocated``;
* ``image``: one 1024² image through the app's engine (fp16 UNet, CFG 6, a random rank-64 STD LoRA fused and
  unfused) at NFE 4 and 8, against the bare UNet+VAE time of the same steps (the limit) and against diffusers' own
  ``StableDiffusionXLImg2ImgPipeline`` with ``TCDScheduler`` on the same weights and timesteps;
* ``stream``: a 16-frame 1024x576 clip through the streamed video path at its defaults (16 frames per batch), with
  its peak memory;
* ``trainer``: the STD presets ``sdxl-12gb`` and ``sdxl-24gb`` and SiD-LSG's ``sd15-12gb``, 3 steps each on random
  real-size weights (``bench/train_memory.py``'s measure, with ``--time-phases``): peak memory and seconds per step
  of each phase (data, VAE, text, teacher, target, student, backward, discriminator, bank, optimizer).

``--smoke`` runs the same code on the tiny zoo on the CPU (the test suite runs it; the trainer section at 64 px
without 8-bit Adam), so the script works when a GPU machine finally runs it:

    python bench/gpu_check.py                 # on one GPU, under 8 minutes on an H100
    python bench/gpu_check.py --smoke         # CPU, tiny models, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2 ** 30
SECTIONS = ("vae", "image", "stream", "trainer")


class Meter:
    """Seconds and the device's peak allocated memory of a block (peak is None on a CPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = None
        self.seconds = time.perf_counter() - self.start
        return False


def figure(name: str, value) -> None:
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def peak(meter: Meter) -> str:
    return "n/a (cpu)" if meter.peak is None else f"{meter.peak / GIB:.2f}"


def build_base(smoke: bool, device: torch.device, root: Path):
    """SDXL at real size with random weights (built on ``device``) or the tiny SDXL-shaped base."""
    from std_hf.base import SD_SCHEDULER, Base, tiny_base
    from std_hf.tiny import tokenizers, write_tokenizer

    if smoke:
        return tiny_base("sdxl")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from comfyui_std.core.schedules import DiscreteSchedule
    from std_hf.configs import CLIP_BIGG, CLIP_L, SDXL_UNET, SDXL_VAE

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        texts = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))]
        vae = AutoencoderKL(**SDXL_VAE)
    return Base(unet, vae, texts, tokenizers(write_tokenizer(root / "tok"), "sdxl"), "sdxl", DiscreteSchedule(),
                "random-sdxl", float(vae.config.scaling_factor), 0.0, [], "random", dict(SD_SCHEDULER))


def write_lora(unet, path: Path, rank: int) -> Path:
    """A random PEFT-format STD LoRA on the attention and feed-forward layers of ``unet`` (std.* metadata)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")):
            out[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            out[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    save_file(out, str(path), metadata={"std.start_strength": "0.75", "std.nfe": "4", "std.method": "std"})
    return path


def section_vae(base, device, smoke: bool) -> None:
    from std_hf.base import LatentCodec
    from std_hf.memory import GIB as G, device_budget, module_bytes, plan_memory

    size, block, one = ((32, 64), 4, (64, 64)) if smoke else ((576, 1024), 16, (1024, 1024))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        vae = base.vae.to(device, dtype)
        codec = LatentCodec(vae, base.latent_scale, device=device)
        budget = device_budget(device) or 80 * G
        plan = plan_memory({"vae": module_bytes(vae)}, size, device=device, budget=budget, offload="none",
                           vae_dtype=dtype)
        with torch.no_grad():
            for label, frames, hw in (("1x1024x1024", 1, one), (f"{block}x1024x576", block, size)):
                x = torch.rand(frames, 3, *hw, device=device) * 2 - 1
                with Meter(device) as m:
                    codec.decode(codec.encode(x, batch=plan.vae_calls(frames)), batch=plan.vae_calls(frames))
                figure(f"vae_{name}_{label}_seconds", m.seconds)
                figure(f"vae_{name}_{label}_peak_gib", peak(m))
    base.vae.to(device, torch.float32)


def _engine(base, device, root: Path, rank: int):
    from std_app.engine import STDEngine
    from std_app.models import LoraCatalog
    from std_hf.base import as_pipeline

    lora = write_lora(base.unet, root / "std_random_eta0.75.safetensors", rank)
    pipe = as_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    return STDEngine(pipe, LoraCatalog.discover([str(lora)], None), "random-sdxl", device=device, offload="none")


def section_image(base, engine, device, smoke: bool) -> None:
    from comfyui_std.core.plan import std_plan
    from std_app.settings import StyleSettings

    side = 32 if smoke else 1024
    dtype = engine.pipe.unet.dtype
    frames = torch.rand(1, side, side, 3)
    lora = next(iter(engine.catalog.entries))
    for nfe in (4, 8):
        settings = StyleSettings(nfe=nfe, cfg=6.0, lora=lora, seed=0)
        for fused in (True, False):
            engine.fuse_loras = fused
            engine.use_lora(None, 1.0)
            engine.run(frames, settings, progress_bar=False)  # warm-up (and the fuse)
            with Meter(device) as m:
                engine.run(frames, settings, progress_bar=False)
            tag = "fused" if fused else "unfused"
            figure(f"image_nfe{nfe}_{tag}_seconds", m.seconds)
            figure(f"image_nfe{nfe}_{tag}_peak_gib", peak(m))
        # the limit: the same UNet calls (batch 2 for CFG) and the VAE, nothing else
        plan = std_plan(nfe, 0.75)
        latent = torch.randn(2, 4, side // 8, side // 8, device=device, dtype=dtype)
        cfg = base.unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        text = torch.randn(2, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
        added = {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device=device, dtype=dtype)}
        with torch.no_grad(), Meter(device) as m:
            engine.codec.encode(torch.rand(1, 3, side, side, device=device) * 2 - 1)
            for t in plan.timesteps:
                base.unet(latent, torch.tensor([t] * 2, device=device), encoder_hidden_states=text,
                          added_cond_kwargs=added, return_dict=False)
            engine.codec.decode(latent[:1].float())
        figure(f"image_nfe{nfe}_bare_unet_vae_seconds", m.seconds)
        diffusers_img2img(engine, frames, nfe, device, dtype)


def diffusers_img2img(engine, frames, nfe: int, device, dtype) -> None:
    """diffusers' own img2img + TCD on the same modules and the same timesteps (LoRA as a PEFT adapter)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, TCDScheduler

    from comfyui_std.core.plan import official_inference_steps

    p = engine.pipe
    pipe = StableDiffusionXLImg2ImgPipeline(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                                            tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2, unet=p.unet,
                                            scheduler=TCDScheduler.from_config(p.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    image = frames.permute(0, 3, 1, 2).to(device)
    steps = official_inference_steps(nfe, 0.75)
    kwargs = dict(prompt="a painting", image=image, strength=0.75, num_inference_steps=steps, guidance_scale=6.0,
                  output_type="pt")
    pipe(**kwargs)
    with Meter(device) as m:
        pipe(**kwargs)
    figure(f"image_nfe{nfe}_diffusers_img2img_seconds", m.seconds)


def section_stream(engine, device, root: Path, smoke: bool) -> None:
    from comfyui_std.core.chunks import Chunking
    from comfyui_std.core.video import save_video
    from std_app.settings import StyleSettings

    h, w, n = (32, 64, 8) if smoke else (576, 1024, 16)
    clip = save_video(torch.rand(n, h, w, 3), root / "clip.mp4", fps=8)
    engine.fuse_loras = True
    lora = next(iter(engine.catalog.entries))
    with Meter(device) as m:
        result = engine.run_video_file(clip, root / "out.mp4", StyleSettings(nfe=4, cfg=6.0, lora=lora),
                                       chunking=Chunking(16))
    figure("stream_frames", result.frames)
    figure("stream_seconds", m.seconds)
    figure("stream_peak_gib", peak(m))


def section_trainer(smoke: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_memory

    for label, name in (("sdxl_12gb", "sdxl-12gb"), ("sdxl_24gb", "sdxl-24gb"), ("sid_sd15_12gb", "sd15-12gb")):
        peak_bytes, phases = train_memory.measure(name, 1 if smoke else 3, "cpu" if smoke else "cuda", tiny=smoke)
        figure(f"trainer_{label}_peak_gib", "n/a (cpu)" if smoke else f"{peak_bytes / GIB:.2f}")
        for phase, seconds in phases.items():
            figure(f"trainer_{label}_{phase}_seconds", seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (what the test suite runs)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(unknown)}")
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    figure("device", "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device))
    with tempfile.TemporaryDirectory(prefix="std-gpu-check-") as tmp:
        root = Path(tmp)
        base = build_base(args.smoke, device, root) if set(only) - {"trainer"} else None
        if base is not None:
            base.to(device)
        t0 = time.perf_counter()
        if "vae" in only:
            section_vae(base, device, args.smoke)
        engine = None
        if {"image", "stream"} & set(only):
            dtype = torch.float32 if args.smoke else torch.float16  # the app's dtypes on a GPU
            base.unet.to(device, dtype)
            for t in base.text_encoders:
                t.to(device, dtype)
            engine = _engine(base, device, root, 4 if args.smoke else 64)
        if "image" in only:
            section_image(base, engine, device, args.smoke)
        if "stream" in only:
            section_stream(engine, device, root, args.smoke)
        if "trainer" in only:
            section_trainer(args.smoke)
    figure("gpu_check_seconds", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
