"""Resident GPU memory of each trainer preset, computed from the real-size models, next to the preset's budget.

Each preset's models are built at full size on the meta device (no weights, no memory): the SD1.5 or SDXL UNet,
text encoders and VAE from their real configs (``std_hf.configs``), the trained LoRA(s) added exactly as the trainer
adds them (``training.common.adapters.add_lora``, the preset's rank and targets), DINOv2-S and the discriminator heads
for the adversarial loss. Then, per preset:

* **frozen weights**: UNet (+ text encoders unless the preset offloads them to the CPU after caching) in the preset's
  frozen dtype, the VAE in its ``vae_dtype``, DINOv2 in fp32;
* **trainable weights** (fp32), **gradients** (fp32, one per trainable weight) and **optimiser state** (AdamW: two
  fp32 moments; bitsandbytes AdamW8bit: two 8-bit moments plus one fp32 absmax per 256 values, 32-bit state for
  tensors under 4096 values); SiD-LSG adds the generator's EMA copy;
* **static total** against the budget the preset is named for, and what that leaves for activations.

Activations are **not** computed here (they depend on kernels and checkpointing); with ``--measure`` on a CUDA
machine the script also trains a few real steps of each preset on random real-size weights and reports
``torch.cuda.max_memory_allocated``. Without a GPU every figure is computed, none measured.

    python bench/train_memory.py [--measure] [--steps 3]
    # last line: train_memory_sdxl12gb_static_fraction: X   (static bytes / 12 GiB; must stay well below 1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
#: preset -> (method, architecture, budget in GiB)
PRESETS = {"sd15-8gb": ("std", "sd15", 8), "sdxl-12gb": ("std", "sdxl", 12), "sdxl-24gb": ("std", "sdxl", 24),
           "sd15-12gb": ("sid_lsg", "sd15", 12), "sd15-24gb": ("sid_lsg", "sd15", 24)}


def preset_config(name: str):
    from training.common.config import config_from_argv

    method = PRESETS[name][0]
    if method == "std":
        from training.std.method import PRESETS as P, STDConfig as C
    else:
        from training.sid_lsg.method import PRESETS as P, SiDConfig as C
    return config_from_argv(C, P, ["--preset", name, "--base", "bench", "--data", "bench"] if method == "std" else
                            ["--preset", name, "--base", "bench", "--prompts", "bench"])


def meta_models(arch: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from std_hf.configs import ARCHITECTURES

    spec = ARCHITECTURES[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        texts = [CLIPTextModel(CLIPTextConfig(**spec["text"][0]))]
        if arch == "sdxl":
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1])))
    return unet, vae, texts


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def optimizer_bytes(params, eight_bit: bool) -> int:
    if not eight_bit:
        return 8 * _numel(params)
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * n + 2 * 4 * ((n + 255) // 256) if n >= 4096 else 8 * n
    return total


def account(name: str) -> dict:
    """Bytes per category for one preset (nothing is allocated)."""
    from training.common.adapters import add_lora
    from training.common.precision import frozen_dtype, vae_dtype

    method, arch, budget = PRESETS[name]
    cfg = preset_config(name)
    unet, vae, texts = meta_models(arch)
    wdt = frozen_dtype(cfg)
    vdt = vae_dtype(cfg)
    if method == "std":
        trained = [p for _, p in add_lora(unet, "student", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)]
        ema = []
    else:
        gen = [p for _, p in add_lora(unet, "gen", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)]
        fake_rank = cfg.fake_rank or cfg.lora_rank
        fake = [p for _, p in add_lora(unet, "fake", fake_rank, cfg.lora_alpha, cfg.lora_targets, 1)]
        trained, ema = gen + fake, gen if cfg.ema_halflife_kimg > 0 else []
    trained_ids = {id(p) for p in trained}
    frozen_unet = sum(p.numel() for p in unet.parameters() if id(p) not in trained_ids)
    text = sum(_numel(t.parameters()) for t in texts)
    out = {"unet": frozen_unet * BYTES[wdt], "vae": _numel(vae.parameters()) * BYTES[vdt],
           "text_encoders": 0 if cfg.offload_text_encoders else text * BYTES[wdt],
           "text_encoders_cpu": text * BYTES[wdt] if cfg.offload_text_encoders else 0,
           "trainable": 4 * _numel(trained), "gradients": 4 * _numel(trained),
           "optimizer": optimizer_bytes(trained, cfg.use_8bit_adam), "ema": 4 * _numel(ema), "adversary": 0}
    if method == "std" and cfg.adversarial:
        from transformers import Dinov2Config, Dinov2Model

        from std_hf.configs import DINOV2_SMALL
        from training.std.adversarial import AdversarialLoss, DinoFeatures

        with torch.device("meta"):
            adv = AdversarialLoss(DinoFeatures(Dinov2Model(Dinov2Config(**DINOV2_SMALL)), cfg.dino_hooks),
                                  texts[-1].config.projection_dim if arch == "sdxl" else texts[0].config.hidden_size)
        heads = list(adv.trainable_parameters())
        out["adversary"] = 4 * _numel(adv.features.parameters()) + (4 + 4 + 8) * _numel(heads)
    out["static"] = sum(v for k, v in out.items() if k != "text_encoders_cpu")
    out.update(budget=budget * GIB, trainable_params=_numel(trained), frozen_dtype=str(wdt).split(".")[-1],
               vae_dtype=cfg.vae_dtype, eight_bit=cfg.use_8bit_adam, rank=cfg.lora_rank, method=method, arch=arch)
    return out


def measure(name: str, steps: int = 3, device: str = "cuda",
            tiny: bool = False) -> tuple[int, dict[str, float]] | None:
    """(torch.cuda.max_memory_allocated, mean seconds per step of each phase) over a few real steps of the preset
    (STD or SiD-LSG) on random real-size weights, with ``--time-phases`` (None without a CUDA GPU).

    ``tiny`` runs the same code on the tiny random zoo at 64 px without 8-bit Adam (a CPU smoke check of this
    function; its peak is 0 off CUDA)."""
    import tempfile

    import numpy as np
    from PIL import Image

    import training.sid_lsg.method as sid_method
    import training.std.method as std_method
    from std_hf.base import SD_SCHEDULER, Base
    from std_hf.tiny import tiny_components, tokenizers, write_tokenizer
    from comfyui_std.core.schedules import DiscreteSchedule
    from training.common.trainer import Trainer

    method, arch, _ = PRESETS[name]
    if not torch.cuda.is_available() and device == "cuda":
        return None
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from std_hf.configs import ARCHITECTURES

    spec = ARCHITECTURES[arch]
    with tempfile.TemporaryDirectory(prefix="std-memory-") as folder:  # data, tokenizer and run folder, removed after
        tmp = Path(folder)
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(
                tmp / f"{i}.png")

        def random_base(*_a, **_k):
            if tiny:
                parts = tiny_components(arch)
                vae, unet = parts["vae"], parts["unet"]
                texts = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if arch == "sdxl" else [])
            else:
                texts = [CLIPTextModel(CLIPTextConfig(**spec["text"][0]))]
                if arch == "sdxl":
                    texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1])))
                vae, unet = AutoencoderKL(**spec["vae"]), UNet2DConditionModel(**spec["unet"])
            return Base(unet, vae, texts, tokenizers(write_tokenizer(tmp / "tok"), arch),
                        arch, DiscreteSchedule(), f"random-{arch}", float(vae.config.scaling_factor), 0.0, [], "random",
                        dict(SD_SCHEDULER))

        cfg = preset_config(name)
        cfg.base, cfg.output, cfg.max_steps = "random", str(tmp / "out"), steps
        cfg.device, cfg.checkpoint_every, cfg.num_previews, cfg.time_phases = device, 0, 0, True
        if tiny:
            cfg.resolution, cfg.use_8bit_adam, cfg.lora_rank, cfg.lora_alpha = 64, False, 4, 4.0
        if method == "std":
            cfg.data, cfg.dino, cfg.dino_hooks = str(tmp), "tiny", [0, 1]
        else:
            (tmp / "prompts.txt").write_text("a photo of a cat\na watercolour of a harbour\n")
            cfg.prompts = str(tmp / "prompts.txt")
        module = std_method if method == "std" else sid_method
        original = module.load_base
        module.load_base = random_base
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            history = Trainer(cfg, module.STDMethod if method == "std" else module.SiDMethod).run()
            phases = {}
            for row in history:
                for k, v in row.items():
                    if k.startswith("time/"):
                        phases[k[5:-2]] = phases.get(k[5:-2], 0.0) + v / len(history)
            return (int(torch.cuda.max_memory_allocated()) if device == "cuda" else 0), phases
        finally:
            module.load_base = original


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="also train a few steps per preset on a CUDA GPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args(argv)
    rows = {name: account(name) for name in args.presets.split(",")}
    print("computed resident GPU memory per preset (GiB; meta-device models at full size, no activations)")
    print(f"{'preset':<10} {'method':<7} {'frozen':>7} {'(dtype)':<9} {'vae':>5} {'text':>5} {'LoRA':>6} {'grads':>6} "
          f"{'optim':>6} {'ema':>5} {'adv':>5} {'static':>7} {'budget':>6} {'left':>6}  trained params")
    for name, r in rows.items():
        g = {k: v / GIB for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"{name:<10} {r['method']:<7} {g['unet']:>7.2f} {r['frozen_dtype']:<9} {g['vae']:>5.2f} "
              f"{g['text_encoders']:>5.2f} {g['trainable']:>6.2f} {g['gradients']:>6.2f} {g['optimizer']:>6.2f} "
              f"{g['ema']:>5.2f} {g['adversary']:>5.2f} {g['static']:>7.2f} {g['budget']:>6.0f} "
              f"{g['budget'] - g['static']:>6.2f}  {r['trainable_params'] / 1e6:.1f} M (rank {r['rank']}"
              f"{', 8-bit Adam' if r['eight_bit'] else ''}"
              f"{', text encoders on the CPU' if r['text_encoders_cpu'] else ''})")
    if args.measure:
        for name in rows:
            got = measure(name, args.steps)
            print(f"{name}: measured peak {got[0] / GIB:.2f} GiB over {args.steps} steps; seconds per step: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in got[1].items()) if got is not None else
                  f"{name}: not measured (needs a CUDA GPU)")
    if "sdxl-12gb" in rows:
        print(f"train_memory_sdxl12gb_static_fraction: {rows['sdxl-12gb']['static'] / rows['sdxl-12gb']['budget']:.3f}")


if __name__ == "__main__":
    main()
