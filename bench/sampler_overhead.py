"""Overhead of the STD sampler over the bare network calls it makes, on one tiny random UNet, in one run.

Runs ``sample_std`` (nfe steps through KDenoiser, i.e. the same path the Gradio app and the trainer use) and, on
the same inputs, exactly nfe bare UNet calls; alternates the two many times and compares the medians, so machine
noise hits both alike. Goal: overhead_ratio <= 1.03 on CPU. Last line: ``overhead_ratio: X``.

    python bench/sampler_overhead.py [--nfe 8] [--repeats 30] [--gamma 0.0]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comfyui_std.core import DiscreteSchedule, KDenoiser, sample_std, std_plan  # noqa: E402


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--start-strength", type=float, default=0.75)
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    unet = tiny_unet()
    cond = torch.randn(1, 8, 32)
    schedule = DiscreteSchedule()

    def fn(x_vp, t):
        return unet(x_vp, t, encoder_hidden_states=cond).sample

    denoiser = KDenoiser(fn, schedule)
    plan = std_plan(args.nfe, args.start_strength)
    sigmas = plan.sigmas(schedule)
    x = torch.randn(1, 4, 32, 32) * sigmas[0]
    ts = torch.tensor(plan.timesteps)

    def run_sampler():
        sample_std(denoiser, x, sigmas, disable=True, gamma=args.gamma, extra_args={"seed": 0})

    @torch.no_grad()
    def run_bare():
        for t in ts:
            fn(x, t.reshape(1))

    with torch.no_grad():
        run_sampler(), run_bare()  # warm-up
        sampler_t, bare_t = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter(); run_sampler(); sampler_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); run_bare(); bare_t.append(time.perf_counter() - t0)
    s, b = statistics.median(sampler_t), statistics.median(bare_t)
    print(f"plan: {plan.describe()}")
    print(f"sampler median {s * 1e3:.2f} ms, bare {args.nfe} UNet calls median {b * 1e3:.2f} ms "
          f"({args.repeats} alternating repeats, {torch.get_num_threads()} threads)")
    print(f"overhead_ratio: {s / b:.3f}")


if __name__ == "__main__":
    main()
