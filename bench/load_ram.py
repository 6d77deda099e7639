"""Peak host RAM while a trainer reads its base model: in fp32 (then cast), or straight in the frozen dtype.

STD and SiD-LSG read the frozen UNet and text encoders in the dtype they train in (bf16 under the bf16 presets) and
the VAE in its ``vae_dtype``; only when a style LoRA must be merged (STD ``--style-lora``) or full UNet copies are
trained (SiD ``--full-finetune``) is everything read in fp32 and cast afterwards. This script writes a random
checkpoint of real size in the LDM layout ComfyUI saves (fp16, a temporary file), then loads it in two fresh
processes exactly as the trainers do (``load_base`` with the read dtype and an fp32 VAE, then ``cast_frozen`` to
bf16) and prints each process's peak resident memory (``ru_maxrss``, minus the process's size after its imports),
next to the bytes of the weights it read. The peak includes the checkpoint's memory-mapped pages that were touched
(file cache the OS can drop under pressure), so it lies above the weights alone.

    python bench/load_ram.py [--arch sd15]     # SD1.5 by default (a 2.1 GB file; SDXL needs ~7 GB disk, 20 GB RAM)
    # last line: load_ram_bf16_over_fp32_<arch>: X   (peak of the bf16 read / peak of the fp32 read; < 1 is the saving)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2**30


def write_checkpoint(path: Path, arch: str) -> int:
    """A real-size random single file (fp16, uninitialised values: only sizes matter here); returns its bytes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from std_hf import ldm
    from std_hf.configs import ARCHITECTURES

    spec = ARCHITECTURES[arch]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**spec["vae"])
        texts = [CLIPTextModel(CLIPTextConfig(**spec["text"][0]))]
        if arch == "sdxl":
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1])))
    modules = [m.to_empty(device="cpu") for m in (unet, vae, *texts)]
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in
          ldm.to_ldm(*modules[:3], modules[3] if arch == "sdxl" else None, arch).items()}
    del modules
    save_file(sd, str(path))
    return path.stat().st_size


def child(path: str, tokenizer: str, read: str) -> None:
    """Load like the trainers and print {"baseline": bytes after imports, "peak": ru_maxrss bytes, "weights": ...}."""
    import diffusers  # noqa: F401  (imported before the baseline, as in a trainer)
    import transformers  # noqa: F401

    from std_hf.base import load_base
    from std_hf.devices import DTYPES
    from training.common.precision import cast_frozen

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = load_base(path, DTYPES[read], tokenizer, vae_dtype=torch.float32)
    cast_frozen(base, torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(t.numel() * t.element_size() for m in (base.unet, base.vae, *base.text_encoders)
                  for t in m.parameters())
    print(json.dumps({"baseline": baseline, "peak": peak, "weights_after_cast": weights}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    ap.add_argument("--child", nargs=3, metavar=("PATH", "TOKENIZER", "READ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    from std_hf.tiny import write_tokenizer

    with tempfile.TemporaryDirectory(prefix="std-load-ram-") as folder:
        path = Path(folder) / f"random_{args.arch}.safetensors"
        size = write_checkpoint(path, args.arch)
        tok = write_tokenizer(Path(folder) / "tok")
        print(f"random {args.arch} checkpoint: {size / GIB:.2f} GiB (fp16, LDM layout)")
        rows = {}
        for read in ("fp32", "bf16"):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(tok), read], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows[read] = json.loads(out)
            r = rows[read]
            print(f"read in {read}, then cast to bf16: peak RSS {(r['peak'] - r['baseline']) / GIB:.2f} GiB above "
                  f"the imports ({r['peak'] / GIB:.2f} GiB in all); weights after the cast "
                  f"{r['weights_after_cast'] / GIB:.2f} GiB")
    ratio = (rows["bf16"]["peak"] - rows["bf16"]["baseline"]) / (rows["fp32"]["peak"] - rows["fp32"]["baseline"])
    print(f"load_ram_bf16_over_fp32_{args.arch}: {ratio:.3f}")


if __name__ == "__main__":
    main()
