"""Real-size memory of the video VAE stage under the memory plan, and the image path's planned GPU bytes per offload
mode, on a CPU with random weights (fp32 activations take the same bytes on a GPU).

1. **VAE stage**: the SDXL VAE at its real size (``std_hf.configs.SDXL_VAE``, random weights, fp32) encodes and
   decodes a block of 1 and of 16 frames at 1024x576 through the project's own video VAE code
   (``std_hf.base.LatentCodec`` in the sub-batches the plan gives, as the app's and the batch CLI's video paths call
   it), planned by ``std_hf.memory.plan_memory`` for ``--vram-budget`` (default 4 GiB) with the real SDXL
   component sizes. Each block runs in a fresh process; the figure is the peak resident memory the stage adds
   (``ru_maxrss`` after it minus the resident memory before it). Without the plan (``--no-plan``: the whole block
   in one call, what the code did before) the 16-frame block adds about 19 GiB.
2. **Image path at 1024²**: the real-size SDXL UNet, text encoders and VAE on the meta device (no memory), their
   bytes in the app's dtypes, and what each offload mode keeps on the GPU plus the estimated peak.

    python bench/real_size_memory.py [--vram-budget 4] [--frames 16]
    # last line: video_vae_peak_ratio_16_over_1_frames: X   (goal <= 1.25)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2 ** 30
SIZE = (576, 1024)  # height, width


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def sdxl_component_bytes() -> dict[str, int]:
    """Bytes of the SDXL components in the app's dtypes (fp16 UNet and text encoders, fp32 VAE), on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from std_hf.configs import CLIP_BIGG, CLIP_L, SDXL_UNET, SDXL_VAE
    from std_hf.memory import module_bytes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.float16)
        te = [CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(torch.float16),
              CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)).to(torch.float16)]
        vae = AutoencoderKL(**{k: v for k, v in SDXL_VAE.items()})
    return {"unet": module_bytes(unet), "text_encoders": sum(module_bytes(t) for t in te), "vae": module_bytes(vae)}


def child(frames: int, budget_gib: float, use_plan: bool) -> dict:
    from diffusers import AutoencoderKL

    from std_hf.base import LatentCodec
    from std_hf.configs import SDXL_VAE
    from std_hf.memory import GIB as G, plan_memory

    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE).eval()
    codec = LatentCodec(vae, SDXL_VAE["scaling_factor"])
    plan = plan_memory(sdxl_component_bytes(), SIZE, device="cuda", budget=int(budget_gib * G), frames_per_batch=1)
    batch = plan.vae_calls(frames) if use_plan else frames
    pixels = torch.rand(frames, 3, *SIZE) * 2 - 1
    with torch.no_grad():
        codec.decode(codec.encode(pixels[:1], batch=1), batch=1)  # warm-up: allocator pools and kernels
        before = rss_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.perf_counter()
        latents = codec.encode(pixels, batch=batch)
        out = codec.decode(latents, batch=batch)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out.shape == pixels.shape
    return {"frames": frames, "vae_batch": batch, "added_peak": max(peak, peak_before) - before, "seconds": seconds,
            "plan": plan.describe()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vram-budget", type=float, default=4.0, help="GiB the plan may use (default 4)")
    ap.add_argument("--frames", type=int, default=16, help="frames of the long block (default 16)")
    ap.add_argument("--no-plan", action="store_true", help="code each block in one VAE call (the code before)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.vram_budget, not args.no_plan)))
        return 0
    from std_hf.memory import plan_memory, unet_peak_bytes

    sizes = sdxl_component_bytes()
    print("SDXL components (app dtypes): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sizes.items()))
    print(f"image path, SDXL at 1024x1024, CFG (UNet activations about {unet_peak_bytes(1024, 1024, 2) / GIB:.2f} "
          f"GiB):")
    for mode in ("none", "model", "sequential"):
        plan = plan_memory(sizes, (1024, 1024), device="cuda", budget=80 * GIB, offload=mode)
        print(f"  offload {mode:10s}: resident {plan.resident / GIB:5.2f} GiB, estimated peak {plan.peak / GIB:5.2f} "
              f"GiB")
    for budget in (8, 12, 24):
        plan = plan_memory(sizes, (1024, 1024), device="cuda", budget=budget * GIB)
        print(f"  auto at {budget:2d} GiB: {plan.describe()}")
    results = {}
    for frames in (1, args.frames):
        cmd = [sys.executable, __file__, "--child", str(frames), "--vram-budget", str(args.vram_budget)]
        cmd += ["--no-plan"] if args.no_plan else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[frames] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[frames]
        print(f"VAE stage, {frames:2d} frame(s) at {SIZE[1]}x{SIZE[0]} fp32, {r['vae_batch']} per call: "
              f"+{r['added_peak'] / GIB:.2f} GiB peak, {r['seconds']:.1f} s")
    print(f"plan: {results[1]['plan']}")
    long = results[args.frames]["added_peak"]
    print(f"the {args.frames}-frame block stays under the {args.vram_budget:g} GiB budget: "
          f"{'yes' if long < args.vram_budget * GIB else 'NO'} (+{long / GIB:.2f} GiB)")
    print(f"video_vae_peak_ratio_{args.frames}_over_1_frames: {long / results[1]['added_peak']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
