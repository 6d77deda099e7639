"""Warping error of an STD-stylized clip: shared noise (the default) versus independent per-frame noise, in one run.

A synthetic 16-frame clip (a textured square sliding 8 px per frame over a static textured background) is
stylized by the real ``STDStylizeVideo`` node on the tests' tiny random SD1.5-shaped checkpoint (NFE 4, start
strength 0.75, frames_per_batch 8, overlap 2) and scored with ``tools.warping_error`` using the source clip's optical
flow. The tiny random VAE decodes everything to a constant, so the clip is put into latent space directly (8x area
downsampling, RGB + gray as the 4 channels) and the stylized latents are read back as RGB and upsampled: the metric
sees exactly what the sampler did. The weights are random, so absolute values mean little; the ratio shows what the
noise mode alone does to temporal consistency. Last line ``warping_error_ratio_shared_vs_per_frame: X`` (below 1
is better).

    COMFYUI_PATH=/path/to/ComfyUI python bench/temporal_consistency.py [--gamma 0.0]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_comfy import boot_tiny, require_comfyui  # noqa: E402
from tools.warping_error import warping_error  # noqa: E402


def sliding_square(frames: int = 16, size: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bg = torch.rand(size // 32, size // 32, 3, generator=g).repeat_interleave(32, 0).repeat_interleave(32, 1)
    tex = torch.rand(4, 4, 3, generator=g).repeat_interleave(16, 0).repeat_interleave(16, 1)
    clip = bg.expand(frames, size, size, 3).clone()
    for t in range(frames):
        x = 16 + 8 * t
        clip[t, 96:160, x:x + 64] = tex
    return clip


def to_latent(frames: torch.Tensor) -> dict:
    """[T,H,W,3] in 0..1 -> LATENT with RGB + gray channels at 1/8 size, in the SD latent range."""
    x = torch.nn.functional.avg_pool2d(frames.movedim(-1, 1), 8)
    x = torch.cat([x, x.mean(1, keepdim=True)], 1)
    return {"samples": (x * 2 - 1) * 4}


def from_latent(latent: dict, scale: int = 8) -> torch.Tensor:
    x = (latent["samples"][:, :3] / 4 + 1) / 2
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear").movedim(1, -1).clamp(0, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument("--nfe", type=int, default=4)
    args = ap.parse_args()
    require_comfyui()
    host, model, _, _, pos, neg = boot_tiny()
    source = sliding_square()
    node = host.M["STDStylizeVideo"]
    results = {}
    with torch.inference_mode():
        lat = to_latent(source)
        reference = from_latent(lat)
        for mode in ("shared", "per_frame"):
            out = node.execute(model, pos, neg, lat, 7, args.nfe, 0.75, args.gamma, 2.0, 8, 2, mode).result[0]
            results[mode] = warping_error(from_latent(out).numpy(), reference.numpy())
    print(f"input clip in latent space (self-warp): {warping_error(reference.numpy()):.4f}")
    for mode, value in results.items():
        print(f"{mode} noise: warping_error {value:.4f}")
    print(f"warping_error_ratio_shared_vs_per_frame: {results['shared'] / results['per_frame']:.3f}")


if __name__ == "__main__":
    main()
