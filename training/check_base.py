"""``python -m training.check_base --base FILE``: does this base model load completely, offline?

Prints the detected architecture and prediction type, where the CLIP tokenizer files came from, and per component
(unet, text_encoder, text_encoder_2, vae) ``loaded N / N tensors`` plus anything in the file that is not used and
why; then every problem (a missing tensor, a tensor with no place in the model, a shape that differs). Exit codes:
0 everything loaded, 1 something is short, 2 the file cannot be read at all (``error: ...``).

The same loader runs in the trainers and the app (:func:`std_hf.base.load_base`), with no network and no Hugging
Face cache needed for single files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from comfyui_std.core.argv import parse_args as parse_argv


def check(base_spec: str, tokenizer: str | None, models_dir: str | None, header_only: bool) -> int:
    from std_hf.base import load_base

    models = Path(models_dir).expanduser() if models_dir else None
    base = load_base(base_spec, torch.float16, tokenizer, models, check_only=True)
    print(f"base: {base.source}")
    for line in base.describe():
        print(line)
    if base.extra.get("tokenizer") and base.extra["tokenizer"] != "None":
        print(f"tokenizer files: {base.extra['tokenizer']}")
    problems = [p for r in base.reports for p in r.problems()]
    if not problems and not header_only:
        load_base(base_spec, torch.float16, tokenizer, models)  # read every tensor (corrupt data shows here)
        print("read every tensor: ok")
    if problems:
        for p in problems:
            print(f"problem: {p}")
        print(f"{len(problems)} problem(s): this base model would not load", file=sys.stderr)
        return 1
    print("ok: every component loaded completely")
    return 0


def main(argv=None) -> int:
    from training.common.cli import guarded

    ap = argparse.ArgumentParser(prog="python -m training.check_base", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a single-file .safetensors checkpoint, a diffusers folder, a name "
                                                  "in --models-dir/checkpoints, or a Hub id")
    ap.add_argument("--tokenizer", help="folder with the CLIP tokenizer files (vocab.json, merges.txt), when no "
                                        "ComfyUI install is found")
    ap.add_argument("--models-dir", help="a ComfyUI models folder (names are looked up in checkpoints/ and "
                                         "diffusers/; its ComfyUI's tokenizer files are found)")
    ap.add_argument("--header-only", action="store_true", help="check names and shapes only, without reading the "
                                                                "tensors")
    args = parse_argv(ap, argv)
    return guarded(check, args.base, args.tokenizer, args.models_dir, args.header_only)


if __name__ == "__main__":
    sys.exit(main())
