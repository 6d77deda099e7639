"""Peak memory of STD video stylization: 64 frames in chunks of 8 versus 8 frames, in one run.

Each configuration runs in a fresh child process (so allocator caches of one cannot hide the other's peak) on the
tiny random SD1.5-shaped checkpoint of the tests, through the real ``STDStylizeVideo`` node. A sampler thread reads
the process RSS every 2 ms while the node runs; the figure is the peak above the RSS just before the call (model,
prompt and input latents already resident, a 1-frame warm-up done). Goal: ratio <= 1.2, i.e. memory is bounded by
frames_per_batch, not by the clip length.

    COMFYUI_PATH=/path/to/ComfyUI python bench/video_memory.py [--frames 64] [--fpb 8] [--size 256]
    # last line: peak_memory_ratio: X
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def child(frames: int, fpb: int, size: int) -> None:
    import torch
    from _tiny_comfy import boot_tiny

    host, model, _, _, pos, neg = boot_tiny()
    node = host.M["STDStylizeVideo"]
    lat = torch.randn(frames, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        node.execute(model, pos, neg, {"samples": lat[:1]}, 0, 4, 0.75, 0.0, 2.0, fpb, 0, "shared")  # warm-up
        base = peak = rss()
        done = threading.Event()

        def watch():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss())
                time.sleep(0.002)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        start = time.perf_counter()
        out = node.execute(model, pos, neg, {"samples": lat}, 0, 4, 0.75, 0.0, 2.0, fpb, 0, "shared").result[0]
        seconds = time.perf_counter() - start
        done.set()
        t.join()
    assert out["samples"].shape[0] == frames
    print(json.dumps({"frames": frames, "fpb": fpb, "peak_delta": peak - base, "seconds": seconds}))


def run_child(frames: int, fpb: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--fpb", str(fpb), "--size", str(size)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if res.returncode != 0:
        sys.exit(f"child {frames} frames failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--fpb", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="frame side in pixels (latents are size/8)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return child(args.frames, args.fpb, args.size)
    from _tiny_comfy import require_comfyui

    require_comfyui()
    short = run_child(args.fpb, args.fpb, args.size)
    long = run_child(args.frames, args.fpb, args.size)
    mib = 2 ** 20
    print(f"{short['frames']} frames: peak +{short['peak_delta'] / mib:.1f} MiB in {short['seconds']:.1f} s")
    print(f"{long['frames']} frames, frames_per_batch {args.fpb}: peak +{long['peak_delta'] / mib:.1f} MiB "
          f"in {long['seconds']:.1f} s")
    print(f"peak_memory_ratio: {long['peak_delta'] / max(short['peak_delta'], 1):.3f}")


if __name__ == "__main__":
    main()
