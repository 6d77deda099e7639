"""Streamed video stylization: peak memory of the batch CLI for N vs 10·N frames, and streamed vs in-memory speed.

1. Throughput, in one process: ``STDEngine.run_video_file`` (decode, encode, stylize, decode, write chunk by chunk,
   audio copied) against the in-memory path the app's Video tab ran before (``load_video`` + ``STDEngine.run`` +
   ``save_video``, no audio) on one clip both can hold, same settings, alternating order, median of ``--repeats`` runs
   after a warm-up of each. Prints ``stream_vs_in_memory_fps_ratio`` (goal >= 0.95).
2. Memory: ``python -m std_app.batch`` on a clip of N and of 10·N frames, each in a fresh process; the figure is the
   process's peak resident set size (``ru_maxrss`` from ``wait4``), everything included (Python, torch, the model).
   ``--contrast`` also runs the in-memory path the same way, to show what the ratio looks like when memory grows
   with the clip. Last line: ``stream_peak_rss_ratio_10x_frames: X`` (goal <= 1.15).

Models: the tiny random SD1.5-shaped zoo of ``std_app.tiny`` (built once into a temporary folder, loaded through the
ordinary model flags). Clips: numbered gray frames with a moving square and a stereo AAC sine track.

    python bench/video_stream_memory.py [--frames 48] [--size 256] [--nfe 2] [--contrast]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_clip(path: Path, frames: int, size: int, fps: int = 24) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        a = out.add_stream("aac", rate=44100, layout="stereo")
        for i in range(frames):
            img = np.full((size, size, 3), (4 * i) % 256, np.uint8)
            x = (5 * i) % (size - size // 6)
            img[: size // 6, x:x + size // 6] = 255
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        samples = int(44100 * frames / fps)
        t = np.arange(samples) / 44100
        wave = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)])).astype(np.float32)
        for s in range(0, samples, 8192):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, s:s + 8192]), format="fltp", layout="stereo")
            f.sample_rate, f.pts, f.time_base = 44100, s, Fraction(1, 44100)
            for p in a.encode(f):
                out.mux(p)
        for p in a.encode():
            out.mux(p)
    return path


def model_flags(root: Path) -> list[str]:
    from std_app import tiny

    return ["--models-dir", str(root), "--base", tiny.base_name("sd15"), "--ip-adapter", tiny.TINY_FILES["ip_adapter"],
            "--image-encoder", tiny.TINY_FILES["image_encoder"], "--device", "cpu", "--dtype", "fp32"]


def peak_rss(cmd: list[str], log: Path) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a fresh process running ``cmd``."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def in_memory_child(argv: list[str]) -> None:
    """The app's former Video-tab path in a fresh process: every frame in memory at once."""
    ap = argparse.ArgumentParser()
    ap.add_argument("clip")
    ap.add_argument("out")
    ap.add_argument("--root")
    ap.add_argument("--size", type=int)
    ap.add_argument("--nfe", type=int)
    ap.add_argument("--fpb", type=int)
    a = ap.parse_args(argv)
    from comfyui_std.core.chunks import Chunking
    from comfyui_std.core.frames import resize_frames
    from comfyui_std.core.video import load_video, save_video
    from std_app.media import fit_size
    from std_app.startup import load_engine, tiny_options

    engine = load_engine(tiny_options("sd15", Path(a.root)))
    frames, info = load_video(a.clip)
    frames = resize_frames(frames, fit_size(info.width, info.height, a.size, engine.vae_scale))
    result = engine.run(frames, settings(a.nfe), progress_bar=False, chunking=Chunking(a.fpb))
    save_video(result.frames, a.out, info.fps)


def settings(nfe: int):
    from std_app.engine import StyleSettings

    return StyleSettings(prompt="an oil painting", nfe=nfe, lora="std_tiny_v2v_eta0.75", seed=0)


def throughput(root: Path, clip: Path, work: Path, args) -> float:
    import torch

    from comfyui_std.core.chunks import Chunking
    from comfyui_std.core.frames import resize_frames
    from comfyui_std.core.video import load_video, save_video
    from std_app.media import fit_size
    from std_app.startup import load_engine, tiny_options

    engine = load_engine(tiny_options("sd15", root))
    s = settings(args.nfe)

    def streamed():
        return engine.run_video_file(clip, work / "stream.mp4", s, size=args.size, chunking=Chunking(args.fpb)).frames

    def in_memory():
        frames, info = load_video(clip)
        frames = resize_frames(frames, fit_size(info.width, info.height, args.size, engine.vae_scale))
        result = engine.run(frames, s, progress_bar=False, chunking=Chunking(args.fpb))
        save_video(result.frames, work / "memory.mp4", info.fps)
        return result.frames.shape[0]

    times = {"stream": [], "memory": []}
    with torch.inference_mode():
        streamed(), in_memory()  # warm-up
        for r in range(args.repeats):
            order = (("stream", streamed), ("memory", in_memory))
            for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate, so drift favours neither
                t = time.perf_counter()
                n = fn()
                times[name].append(time.perf_counter() - t)
    fps = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"throughput on {n} frames at {args.size}x{args.size}, NFE {args.nfe}, {args.fpb} frames per batch "
          f"(median of {args.repeats}): streamed {fps['stream']:.2f} frames/s, in memory {fps['memory']:.2f} frames/s")
    return fps["stream"] / fps["memory"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=48, help="N: the short clip (the long one has 10·N)")
    ap.add_argument("--size", type=int, default=256, help="frame side in pixels")
    ap.add_argument("--nfe", type=int, default=2)
    ap.add_argument("--fpb", type=int, default=8, help="frames per batch")
    ap.add_argument("--repeats", type=int, default=6, help="throughput runs of each path")
    ap.add_argument("--throughput-frames", type=int, default=32, help="clip length of the throughput comparison")
    ap.add_argument("--contrast", action="store_true", help="also measure the in-memory path's N vs 10·N peak RSS")
    ap.add_argument("--child-in-memory", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_in_memory is not None:
        return in_memory_child(args.child_in_memory)
    from std_app import tiny

    with tempfile.TemporaryDirectory(prefix="std-bench-") as tmp:
        work = Path(tmp)
        root = tiny.build_tiny_models(work / "models", "sd15")
        ratio_fps = throughput(root, make_clip(work / "both.mp4", args.throughput_frames, args.size), work, args)
        print(f"stream_vs_in_memory_fps_ratio: {ratio_fps:.3f}")
        mib = 2 ** 20
        peaks = {}
        for n in (args.frames, 10 * args.frames):
            clip = make_clip(work / f"clip{n}.mp4", n, args.size)
            out = work / f"out{n}"
            cmd = [sys.executable, "-m", "std_app.batch", str(clip), "--output", str(out), *model_flags(root),
                   "--nfe", str(args.nfe), "--size", str(args.size), "--frames-per-batch", str(args.fpb),
                   "--prompt", "an oil painting", "--use-lora", "std_tiny_v2v_eta0.75"]
            peaks[n], seconds = peak_rss(cmd, work / f"log{n}.txt")
            print(f"batch CLI, {n} frames at {args.size}x{args.size}: peak RSS {peaks[n] / mib:.0f} MiB "
                  f"({seconds:.0f} s, {n / seconds:.2f} frames/s including start-up)")
            if args.contrast:
                cmd = [sys.executable, __file__, "--child-in-memory", str(clip), str(work / f"mem{n}.mp4"),
                       "--root", str(root), "--size", str(args.size), "--nfe", str(args.nfe), "--fpb", str(args.fpb)]
                peak, seconds = peak_rss(cmd, work / f"mlog{n}.txt")
                peaks[f"memory{n}"] = peak
                print(f"in-memory path, {n} frames: peak RSS {peak / mib:.0f} MiB ({seconds:.0f} s)")
        if args.contrast:
            ratio = peaks[f"memory{10 * args.frames}"] / peaks[f"memory{args.frames}"]
            print(f"in_memory_peak_rss_ratio_10x_frames: {ratio:.3f}")
        print(f"stream_peak_rss_ratio_10x_frames: {peaks[10 * args.frames] / peaks[args.frames]:.3f}")


if __name__ == "__main__":
    main()
