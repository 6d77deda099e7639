"""Temporal-consistency metric: the warping error of a video (lower is more consistent).

For each pair of consecutive frames, dense optical flow (OpenCV Farneback, CPU, no model download) is computed on
the *reference* clip (by default the clip itself; pass the source clip to measure a stylized result against the
motion of its input). Frame t of the evaluated clip is warped onto frame t+1 with that flow, and the mean absolute
difference is taken over pixels whose forward-backward flow is consistent (occlusions masked out). Values are in
0..1 units of the RGB range.

    python -m tools.warping_error stylized.mp4 [--reference source.mp4]
    # last line: warping_error: X
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import cv2

    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    return cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def _warp(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``img`` at x + flow(x): brings frame t onto frame t+1 given the flow from t+1 to t."""
    import cv2

    h, w = flow.shape[:2]
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).astype(np.float32)
    return cv2.remap(img, grid + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def warping_error(frames, reference=None, consistency: float = 1.0) -> float:
    """Mean masked |warp(f_t) - f_{t+1}| over a clip; ``frames`` and ``reference`` are [T, H, W, 3] in 0..1."""
    f = (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).astype(np.uint8)
    r = f if reference is None else (np.clip(np.asarray(reference, dtype=np.float32), 0, 1) * 255).astype(np.uint8)
    if f.ndim != 4 or f.shape[0] < 2:
        raise ValueError("frames: need at least 2 frames [T, H, W, 3]")
    if r.shape[:3] != f.shape[:3]:
        raise ValueError(f"reference: shape {r.shape} does not match frames {f.shape}")
    errs = []
    for t in range(len(f) - 1):
        back = _flow(r[t + 1], r[t])    # for each pixel of t+1, where it was in t
        fwd = _flow(r[t], r[t + 1])
        fb = back + _warp(fwd, back)     # ~0 where forward and backward flows agree
        mask = (np.linalg.norm(fb, axis=-1) < consistency).astype(np.float32)[..., None]
        warped = _warp(f[t], back).astype(np.float32) / 255
        diff = np.abs(warped - f[t + 1].astype(np.float32) / 255) * mask
        errs.append(diff.sum() / max(1.0, mask.sum() * 3))
    return float(np.mean(errs))


def main(argv=None):
    from comfyui_std.core.video import load_video

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video")
    ap.add_argument("--reference", help="clip whose motion defines the flow (default: the video itself)")
    ap.add_argument("--frame-load-cap", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        frames, _ = load_video(args.video, frame_load_cap=args.frame_load_cap)
        ref = load_video(args.reference, frame_load_cap=args.frame_load_cap)[0].numpy() if args.reference else None
        value = warping_error(frames.numpy(), ref)
    except (ValueError, OSError) as err:  # STDInputError is a ValueError; unreadable paths are OSErrors
        ap.exit(2, f"warping_error: error: {err}\n")
    except Exception as err:  # OpenCV's cv2.error for frames its optical flow cannot take (e.g. too small)
        if type(err).__module__.startswith("cv2"):
            ap.exit(2, f"warping_error: error: frames: optical flow failed on these frames ({str(err).strip()})\n")
        raise
    print(f"warping_error: {value:.4f}")


if __name__ == "__main__":
    main()
