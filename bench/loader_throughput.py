"""Video loader: a capped read of a long clip versus a full decode, in one run.

Writes a synthetic 600-frame 320x240 h264 clip (30 fps, 20 s), then alternates ``load_video(cap=16)`` and a full
``load_video()`` several times and compares median wall times. A streamed decoder stops after the frames it needs,
so the capped read costs about cap/frames of the full one (plus the container open). Prints frames/s returned and
decoded for both; last line ``capped_read_time_fraction: X`` (capped time / full time; goal: well below 0.1).

    python bench/loader_throughput.py [--frames 600] [--cap 16] [--repeats 5]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comfyui_std.core.video import load_video, save_video  # noqa: E402


def synthetic_clip(path: Path, frames: int, fps: float = 30.0) -> Path:
    """A textured square moving over a gradient: cheap to make, not trivially compressible."""
    h, w = 240, 320
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([x, y, 1 - x * y], -1)
    noise = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(0)) * 0.2
    out = base.expand(frames, h, w, 3).clone()
    for t in range(frames):
        c = 20 + (t * 3) % (w - 80)
        out[t, 80:140, c:c + 60] = noise[80:140, c:c + 60] + 0.6
    return save_video(out.clamp(0, 1), path, fps)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--cap", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip = synthetic_clip(Path(tmp) / "long.mp4", args.frames)
        capped_t, full_t = [], []
        for _ in range(args.repeats):
            t, (frames_c, info_c) = timed(lambda: load_video(clip, frame_load_cap=args.cap))
            capped_t.append(t)
            t, (frames_f, info_f) = timed(lambda: load_video(clip))
            full_t.append(t)
    c, f = statistics.median(capped_t), statistics.median(full_t)
    print(f"capped read: {info_c.frame_count} frames returned, {info_c.decoded_frames} decoded, {c * 1000:.1f} ms "
          f"({info_c.frame_count / c:.0f} frames/s returned)")
    print(f"full decode: {info_f.frame_count} frames returned, {info_f.decoded_frames} decoded, {f * 1000:.1f} ms "
          f"({info_f.frame_count / f:.0f} frames/s)")
    print(f"capped_read_time_fraction: {c / f:.4f}")


if __name__ == "__main__":
    main()
