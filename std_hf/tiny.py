"""Tiny randomly initialised SD1.5- and SDXL-shaped models: the one builder behind ``python gradio_app.py --tiny``
(the app's model zoo, :mod:`std_app.tiny`), the trainers' ``tiny`` base and the tests' single-file checkpoints.

The UNets keep the block layout of the real architectures (SD1.5: four levels, attention in the first three; SDXL:
three levels, attention in the last two, two layers per block) so the style-block presets select real blocks. Two
shapes exist:

* :data:`APP` (default): the smallest that runs (widths 16/32, 8 norm groups, 2 heads); the app zoo and the
  trainers' ``tiny`` preset;
* :data:`LDM`: what the LDM single-file layout can hold, since its configs are read from shapes and the rest is
  fixed by the architecture (32 norm groups, 8 heads for SD1.5, 64-channel heads for SDXL and CLIP, hence one head
  at these widths); SDXL gets two transformer layers in its deepest level and a second text tower of another width
  (48, projected to 40), so a map that confuses levels, towers or transposes shows up as a wrong shape.

Nothing is downloaded; building takes a second on a CPU. Tokenizers are byte-level CLIP tokenizers written to disk
(every byte is a token; 514 ids), or the real CLIP tokenizer files when a test has them (``vocab`` 49408).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_WIDTH = 32
BYTE_VOCAB = 514  # 512 byte tokens (with and without </w>) + <|startoftext|> + <|endoftext|>


@dataclass(frozen=True)
class TinyShape:
    unet_widths: dict            # arch -> block widths
    norm_groups: int
    sd15_heads: int              # SD1.5 attention heads per block
    sdxl_heads: object           # int heads, or "64ch" (width // 64, at least 1)
    sdxl_depth: tuple            # transformer layers per SDXL level
    text_heads: int
    text2_width: int             # SDXL's second text tower
    text2_projection: int
    vae_widths: tuple
    layers_per_block: dict       # arch -> res blocks per level


APP = TinyShape({"sd15": (16, 16, 32, 32), "sdxl": (16, 16, 32)}, 8, 2, 2, (1, 1, 1), 2, TEXT_WIDTH, TEXT_WIDTH,
                (8, 8, 8, 8), {"sd15": 1, "sdxl": 2})
LDM = TinyShape({"sd15": (32, 32, 64, 64), "sdxl": (32, 32, 64)}, 32, 8, "64ch", (1, 1, 2), 1, 48, 40,
                (32, 32, 64, 64), {"sd15": 2, "sdxl": 2})


def _heads(shape: TinyShape, arch: str):
    if arch == "sd15":
        return shape.sd15_heads
    if shape.sdxl_heads == "64ch":
        return tuple(max(1, w // 64) for w in shape.unet_widths["sdxl"])
    return shape.sdxl_heads


def make_unet(arch: str, shape: TinyShape = APP):
    """A tiny UNet with the block layout of ``arch`` (random weights from the global RNG)."""
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=shape.norm_groups,
                  attention_head_dim=_heads(shape, arch), block_out_channels=shape.unet_widths[arch],
                  layers_per_block=shape.layers_per_block[arch])
    if arch == "sdxl":
        pooled = shape.text2_projection
        extra = {} if shape.sdxl_depth == (1, 1, 1) else {"transformer_layers_per_block": shape.sdxl_depth}
        return UNet2DConditionModel(
            **common, **extra, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_WIDTH + shape.text2_width, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + pooled, use_linear_projection=True)
    return UNet2DConditionModel(
        **common, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH)


def make_vae(shape: TinyShape = APP, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=shape.vae_widths, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=shape.norm_groups,
                         layers_per_block=1, sample_size=64, scaling_factor=scaling_factor)


def make_text_encoder(with_projection: bool, shape: TinyShape = APP, second: bool = False, vocab: int = BYTE_VOCAB):
    """A tiny CLIP text tower; ``second``: SDXL's second tower (``shape.text2_width``, GELU, projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = shape.text2_width if second else TEXT_WIDTH
    ids = (dict(bos_token_id=512, eos_token_id=513, pad_token_id=513) if vocab == BYTE_VOCAB else
           dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=shape.text_heads if shape is APP else max(1, width // 64),
                            max_position_embeddings=77, projection_dim=shape.text2_projection if second else width,
                            hidden_act="gelu" if (second and shape is not APP) else "quick_gelu", **ids)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_components(arch: str, seed: int = 0, shape: TinyShape = APP, vocab: int = BYTE_VOCAB) -> dict:
    """vae, text_encoder, unet (and SDXL's text_encoder_2), built in this order after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    out = {"vae": make_vae(shape, 0.13025 if (arch == "sdxl" and shape is LDM) else 0.18215),
           "text_encoder": make_text_encoder(False, shape, vocab=vocab), "unet": make_unet(arch, shape)}
    if arch == "sdxl":
        out["text_encoder_2"] = make_text_encoder(True, shape, second=True, vocab=vocab)
    return out


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """A byte-level CLIP tokenizer (no merges) that needs no download: every byte is a token (514 ids)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tokenizers(folder: Path, arch: str):
    from transformers import CLIPTokenizer

    toks = [CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)]
    if arch == "sdxl":
        toks.append(CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="!"))
    return toks
