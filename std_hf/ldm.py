"""The LDM single-file layout (what ComfyUI, A1111 and Civitai checkpoints use) <-> diffusers/transformers modules.

A single-file SD1.5 or SDXL checkpoint holds four (SDXL: five) components under fixed prefixes:

=====================  ==================================  ===============================================
component              prefix in the file                  module here
=====================  ==================================  ===============================================
``unet``               ``model.diffusion_model.``          ``diffusers.UNet2DConditionModel``
``vae``                ``first_stage_model.``              ``diffusers.AutoencoderKL`` (or ``AutoencoderTiny``)
``text_encoder``       SD1.5 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``
                                                           ``transformers.CLIPTextModel`` (CLIP ViT-L/14)
``text_encoder_2``     ``conditioner.embedders.1.model.`` (SDXL, OpenCLIP layout)
                                                           ``transformers.CLIPTextModelWithProjection`` (bigG)
=====================  ==================================  ===============================================

Everything here is a pure function of tensor names and shapes: :func:`unet_config` / :func:`vae_config` /
:func:`clip_config` / :func:`open_clip_config` read a diffusers/transformers config from the shapes (no Hub, no
config files), and ``*_key_map`` functions pair every tensor name of a module with its name in the file, one to one,
so a loader can count what it filled and name anything missing or left over. The same maps, read backwards, write
the LDM layout (:func:`to_ldm`), which the tests use to build single files.

What shapes cannot tell is fixed by the architecture, as the original code fixes it: group norms have 32 groups;
SD1.5 attention has 8 heads per block, SDXL 64 channels per head; CLIP text towers have 64 channels per head.
"""

from __future__ import annotations

import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD15_TEXT = "cond_stage_model.transformer."
SDXL_TEXT = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."

#: tensors a file may carry that no module here holds, with the reason (reported, never silently dropped)
IGNORED = {"position_ids": "fixed position index buffer",
           "logit_scale": "CLIP training temperature (unused by a text encoder)",
           "text_projection.weight": "CLIP-L's projection (the UNet reads its hidden states, not the projection)"}

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class LayoutError(ValueError):
    """The file's tensors do not form a model of the expected layout (message names the component and tensor)."""


def _index(key: str, prefix: str) -> int:
    return int(key[len(prefix):].split(".", 1)[0])


def _need(sd: dict, key: str, component: str) -> torch.Tensor:
    if key not in sd:
        raise LayoutError(f"{component}: tensor {key} is missing")
    return sd[key]


# --------------------------------------------------------------------------------------------------------------------
# UNet

def unet_levels(sd: dict[str, torch.Tensor], prefix: str = UNET) -> dict:
    """The block structure of an LDM UNet: per level its res-block indices, width, attention depth."""
    inputs: dict[int, set[int]] = {}
    for k in sd:
        if k.startswith(prefix + "input_blocks."):
            i, j = k[len(prefix + "input_blocks."):].split(".")[:2]
            inputs.setdefault(int(i), set()).add(int(j))
    if 0 not in inputs:
        raise LayoutError(f"unet: tensor {prefix}input_blocks.0.0.weight is missing")
    levels, current = [], []
    for i in sorted(k for k in inputs if k > 0):
        if any(k.startswith(f"{prefix}input_blocks.{i}.0.op.") for k in sd):
            levels.append((current, i))
            current = []
        else:
            current.append(i)
    levels.append((current, None))
    out = []
    for res, down in levels:
        if not res:
            raise LayoutError("unet: a level without res blocks (input_blocks are not contiguous)")
        width = int(_need(sd, f"{prefix}input_blocks.{res[0]}.0.out_layers.3.weight", "unet").shape[0])
        depth = len({k.split(".")[len(prefix.split(".")) + 3] for k in sd
                     if k.startswith(f"{prefix}input_blocks.{res[0]}.1.transformer_blocks.")})
        out.append({"res": res, "down": down, "width": width, "depth": depth})
    return {"levels": out, "layers_per_block": len(out[0]["res"])}


def _transformer_depth(sd, block: str) -> int:
    return len({k[len(block):].split(".")[0] for k in sd if k.startswith(block)})


def unet_config(sd: dict[str, torch.Tensor], arch: str, pooled_dim: int | None = None,
                prefix: str = UNET) -> dict:
    """The ``UNet2DConditionModel`` config of an SD1.5 (``arch="sd15"``) or SDXL LDM UNet, from its shapes.

    ``pooled_dim`` (SDXL): width of the pooled text embedding, to split the added-condition input into text and
    six size embeddings.
    """
    info = unet_levels(sd, prefix)
    levels, nb = info["levels"], info["layers_per_block"]
    if any(len(lv["res"]) != nb for lv in levels):
        raise LayoutError("unet: levels with different numbers of res blocks are not an SD1.5/SDXL UNet")
    widths = [lv["width"] for lv in levels]
    if any(w % 32 for w in widths):
        raise LayoutError(f"unet: block widths {widths} do not divide into the architecture's 32 norm groups; pass "
                          "a diffusers folder with this model's configs (--base-config)")
    attn = [lv["depth"] > 0 for lv in levels]
    ctx_key = next((k for k in sd if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    if ctx_key is None:
        raise LayoutError("unet: no cross-attention layer (attn2.to_k.weight); not a text-conditioned UNet")
    proj_in = next(k for k in sd if k.startswith(prefix) and k.endswith("proj_in.weight"))
    up_depth = []
    for u in range(len(levels)):
        block = f"{prefix}output_blocks.{u * (nb + 1)}.1.transformer_blocks."
        up_depth.append(_transformer_depth(sd, block))
    down_depth = [lv["depth"] or 1 for lv in levels]
    if sd.get(prefix + "middle_block.1.proj_in.weight") is None:
        raise LayoutError("unet: the middle block has no attention; not an SD1.5/SDXL UNet")
    mid_depth = _transformer_depth(sd, prefix + "middle_block.1.transformer_blocks.")
    if arch == "sdxl":
        heads = [max(1, w // 64) for w in widths]
    else:
        heads = [8] * len(widths)
    cfg = dict(
        sample_size=128 if arch == "sdxl" else 64,
        in_channels=int(_need(sd, prefix + "input_blocks.0.0.weight", "unet").shape[1]),
        out_channels=int(_need(sd, prefix + "out.2.weight", "unet").shape[0]),
        block_out_channels=tuple(widths), layers_per_block=nb,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=int(sd[ctx_key].shape[1]), attention_head_dim=tuple(heads) if arch == "sdxl" else 8,
        use_linear_projection=sd[proj_in].ndim == 2, norm_num_groups=32,
    )
    layers = [d if a else 1 for d, a in zip(down_depth, attn)]
    if mid_depth != layers[-1] and attn[-1]:
        raise LayoutError(f"unet: the middle block has {mid_depth} transformer layers but the deepest level "
                          f"{layers[-1]}; not an SD1.5/SDXL UNet")
    if any(d > 1 for d in layers) or mid_depth > 1:
        cfg["transformer_layers_per_block"] = tuple(layers)
        if not attn[-1]:
            raise LayoutError("unet: the deepest level has no attention; not an SD1.5/SDXL UNet")
    reverse = [d if a else 1 for d, a in zip(up_depth, reversed(attn))]
    if reverse != list(reversed(layers)):
        cfg["reverse_transformer_layers_per_block"] = tuple(reverse)
    t_key = prefix + "time_embed.0.weight"
    if tuple(_need(sd, t_key, "unet").shape) != (4 * widths[0], widths[0]):
        raise LayoutError(f"unet: {t_key} has shape {tuple(sd[t_key].shape)}, expected {(4 * widths[0], widths[0])}")
    adm = sd.get(prefix + "label_emb.0.0.weight")
    if arch == "sdxl":
        if adm is None:
            raise LayoutError(f"unet: tensor {prefix}label_emb.0.0.weight is missing (SDXL's size conditioning)")
        if pooled_dim is None or (adm.shape[1] - pooled_dim) % 6 or adm.shape[1] <= pooled_dim:
            raise LayoutError(f"unet: label_emb takes {adm.shape[1]} inputs, which is not the pooled text width "
                              f"{pooled_dim} plus six size embeddings")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm.shape[1] - pooled_dim) // 6,
                   projection_class_embeddings_input_dim=int(adm.shape[1]))
    elif adm is not None:
        raise LayoutError("unet: a class-conditioned UNet (label_emb) is not an SD1.5 UNet")
    return cfg


def unet_key_map(config: dict, model_keys) -> dict[str, str]:
    """{diffusers key: LDM key (without the file prefix)} for every tensor of a ``UNet2DConditionModel``."""
    nb = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    attn_down = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    blocks: list[tuple[str, str, dict | None]] = [
        ("conv_in", "input_blocks.0.0", None), ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None), ("add_embedding.linear_1", "label_emb.0.0", None),
        ("add_embedding.linear_2", "label_emb.0.2", None), ("conv_norm_out", "out.0", None),
        ("conv_out", "out.2", None), ("mid_block.resnets.0", "middle_block.0", _RESNET),
        ("mid_block.attentions.0", "middle_block.1", None), ("mid_block.resnets.1", "middle_block.2", _RESNET)]
    for lv in range(levels):
        for j in range(nb):
            k = 1 + lv * (nb + 1) + j
            blocks.append((f"down_blocks.{lv}.resnets.{j}", f"input_blocks.{k}.0", _RESNET))
            if attn_down[lv]:
                blocks.append((f"down_blocks.{lv}.attentions.{j}", f"input_blocks.{k}.1", None))
        if lv < levels - 1:
            blocks.append((f"down_blocks.{lv}.downsamplers.0.conv", f"input_blocks.{1 + lv * (nb + 1) + nb}.0.op",
                           None))
    for u in range(levels):
        has_attn = attn_down[levels - 1 - u]
        for j in range(nb + 1):
            k = u * (nb + 1) + j
            blocks.append((f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0", _RESNET))
            if has_attn:
                blocks.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", None))
            if j == nb and u < levels - 1:
                blocks.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{k}.{2 if has_attn else 1}.conv",
                               None))
    return _pair(model_keys, blocks, "unet")


def _pair(model_keys, blocks, component: str) -> dict[str, str]:
    table = sorted(blocks, key=lambda b: -len(b[0]))
    out = {}
    for key in model_keys:
        for dpre, lpre, inner in table:
            if key.startswith(dpre + "."):
                rest = key[len(dpre) + 1:]
                if inner:
                    for dname, lname in sorted(inner.items(), key=lambda x: -len(x[0])):
                        if rest.startswith(dname + "."):
                            rest = lname + rest[len(dname):]
                            break
                out[key] = f"{lpre}.{rest}"
                break
        else:
            raise LayoutError(f"{component}: no LDM name for {key} (an unsupported block layout)")
    return out


# --------------------------------------------------------------------------------------------------------------------
# VAE

def vae_config(sd: dict[str, torch.Tensor], arch: str, prefix: str = VAE) -> dict:
    """The ``AutoencoderKL`` config of an LDM VAE from its shapes (SD1.5 / SDXL scaling factors)."""
    down = sorted({_index(k, prefix + "encoder.down.") for k in sd if k.startswith(prefix + "encoder.down.")})
    if not down:
        raise LayoutError(f"vae: tensor {prefix}encoder.down.0.block.0.conv1.weight is missing")
    widths = [int(_need(sd, f"{prefix}encoder.down.{i}.block.0.conv2.weight", "vae").shape[0]) for i in down]
    if any(w % 32 for w in widths):
        raise LayoutError(f"vae: block widths {widths} do not divide into the architecture's 32 norm groups; pass "
                          "a diffusers folder with this model's configs (--base-config)")
    per_level = len({k.split(".")[len(prefix.split(".")) + 3] for k in sd
                     if k.startswith(f"{prefix}encoder.down.0.block.")})
    z = _need(sd, prefix + "encoder.conv_out.weight", "vae")
    has_quant = prefix + "quant_conv.weight" in sd
    return dict(in_channels=int(_need(sd, prefix + "encoder.conv_in.weight", "vae").shape[1]),
                out_channels=int(_need(sd, prefix + "decoder.conv_out.weight", "vae").shape[0]),
                down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=tuple(widths),
                layers_per_block=per_level, latent_channels=int(z.shape[0]) // 2, norm_num_groups=32,
                sample_size=1024 if arch == "sdxl" else 512, scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
                force_upcast=arch == "sdxl", use_quant_conv=has_quant,
                use_post_quant_conv=prefix + "post_quant_conv.weight" in sd)


def vae_key_map(config: dict, model_keys) -> dict[str, str]:
    """{diffusers key: LDM key} for every tensor of an ``AutoencoderKL``."""
    levels = len(config["block_out_channels"])
    nb = config["layers_per_block"]
    blocks = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.conv_out", f"{part}.conv_out", None),
                   (f"{part}.conv_norm_out", f"{part}.norm_out", None),
                   (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                   (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                   (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)]
    for i in range(levels):
        for j in range(nb):
            blocks.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            blocks.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None))
        for j in range(nb + 1):
            blocks.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}",
                           _VAE_RESNET))
        if i < levels - 1:
            blocks.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv",
                           None))
    return _pair(model_keys, blocks, "vae")


def vae_tensor(model_key: str, file_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The LDM VAE stores its mid-block attention projections as 1x1 convolutions; diffusers as linear layers."""
    if file_tensor.ndim == 4 and like.ndim == 2 and file_tensor.shape[2:] == (1, 1):
        return file_tensor[:, :, 0, 0]
    return file_tensor


TAESD_ENCODER, TAESD_DECODER = "taesd_encoder.", "taesd_decoder."


def taesd_key_map(model_keys) -> dict[str, str]:
    """{diffusers ``AutoencoderTiny`` key: key in a ComfyUI TAESD}; ComfyUI's decoder starts with a Clamp module
    (index 0) that diffusers applies inline."""
    out = {}
    for k in model_keys:
        if k.startswith("encoder.layers."):
            out[k] = TAESD_ENCODER + k[len("encoder.layers."):]
        elif k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            out[k] = f"{TAESD_DECODER}{int(i) + 1}.{rest}"
        else:
            raise LayoutError(f"vae: no TAESD name for {k}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Text encoders

def clip_config(sd: dict[str, torch.Tensor], prefix: str) -> dict:
    """A ``CLIPTextConfig`` (CLIP ViT-L/14 text tower, transformers keys under ``prefix``) from its shapes."""
    tok = _need(sd, prefix + "text_model.embeddings.token_embedding.weight", "text_encoder")
    layers = {_index(k, prefix + "text_model.encoder.layers.") for k in sd
              if k.startswith(prefix + "text_model.encoder.layers.")}
    hidden = int(tok.shape[1])
    cfg = dict(vocab_size=int(tok.shape[0]), hidden_size=hidden,
               intermediate_size=int(_need(sd, prefix + "text_model.encoder.layers.0.mlp.fc1.weight",
                                           "text_encoder").shape[0]),
               num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64),
               max_position_embeddings=int(_need(sd, prefix + "text_model.embeddings.position_embedding.weight",
                                                 "text_encoder").shape[0]),
               hidden_act="quick_gelu", projection_dim=hidden)
    if prefix + "text_projection.weight" in sd:
        cfg["projection_dim"] = int(sd[prefix + "text_projection.weight"].shape[0])
    return cfg


def open_clip_config(sd: dict[str, torch.Tensor], prefix: str = SDXL_TEXT_2) -> dict:
    """A ``CLIPTextConfig`` for SDXL's OpenCLIP ViT-bigG text tower (OpenCLIP keys under ``prefix``)."""
    tok = _need(sd, prefix + "token_embedding.weight", "text_encoder_2")
    blocks = prefix + "transformer.resblocks."
    layers = {_index(k, blocks) for k in sd if k.startswith(blocks)}
    hidden = int(tok.shape[1])
    return dict(vocab_size=int(tok.shape[0]), hidden_size=hidden,
                intermediate_size=int(_need(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight",
                                            "text_encoder_2").shape[0]),
                num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64),
                max_position_embeddings=int(_need(sd, prefix + "positional_embedding", "text_encoder_2").shape[0]),
                hidden_act="gelu", projection_dim=int(_need(sd, prefix + "text_projection", "text_encoder_2").shape[1]))


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def open_clip_key_map(model_keys, prefix: str = SDXL_TEXT_2) -> dict[str, tuple[str, int | None]]:
    """{transformers key: (OpenCLIP key, q/k/v slice or None)}: q, k and v are thirds of one ``in_proj`` tensor."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
    out = {}
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for k in model_keys:
        if k in fixed:
            out[k] = (prefix + fixed[k], None)
            continue
        m = layer.match(k)
        if m is None:
            raise LayoutError(f"text_encoder_2: no OpenCLIP name for {k}")
        n, module, kind = m.groups()
        base = f"{prefix}transformer.resblocks.{n}."
        if module in _QKV:
            out[k] = (f"{base}attn.in_proj_{kind}", _QKV[module])
        elif module in _OPEN_CLIP_LAYER:
            out[k] = (f"{base}{_OPEN_CLIP_LAYER[module]}.{kind}", None)
        else:
            raise LayoutError(f"text_encoder_2: no OpenCLIP name for {k}")
    return out


def open_clip_tensor(model_key: str, file_tensor: torch.Tensor, part: int | None) -> torch.Tensor:
    if part is not None:
        third = file_tensor.shape[0] // 3
        return file_tensor[part * third:(part + 1) * third]
    if model_key == "text_projection.weight":
        return file_tensor.t()  # OpenCLIP multiplies x @ P; a Linear layer holds P^T
    return file_tensor


# --------------------------------------------------------------------------------------------------------------------
# Writing the layout (tests, tools)

def to_ldm(unet=None, vae=None, text_encoder=None, text_encoder_2=None, arch: str = "sd15") -> dict[str, torch.Tensor]:
    """The single-file state dict of the given modules, laid out as ComfyUI saves a checkpoint."""
    out: dict[str, torch.Tensor] = {}
    if unet is not None:
        sd = unet.state_dict()
        for k, v in unet_key_map(dict(unet.config), sd).items():
            out[UNET + v] = sd[k]
    if vae is not None:
        sd = vae.state_dict()
        mapping = (taesd_key_map(sd) if type(vae).__name__ == "AutoencoderTiny" else vae_key_map(dict(vae.config), sd))
        for k, v in mapping.items():
            t = sd[k]
            out[VAE + v] = t[:, :, None, None] if (t.ndim == 2 and ".mid.attn_1." in v) else t
    if text_encoder is not None:
        prefix = SDXL_TEXT if arch == "sdxl" else SD15_TEXT
        for k, v in text_encoder.state_dict().items():
            if not k.startswith("text_projection"):
                out[prefix + ("" if k.startswith("text_model.") else "text_model.") + k] = v
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(
            text_encoder.config.max_position_embeddings)[None]
    if text_encoder_2 is not None:
        sd = text_encoder_2.state_dict()
        qkv: dict[str, list] = {}
        for k, (name, part) in open_clip_key_map(sd).items():
            if part is not None:
                qkv.setdefault(name, [None] * 3)[part] = sd[k]
            else:
                out[name] = sd[k].t() if k == "text_projection.weight" else sd[k]
        for name, parts in qkv.items():
            out[name] = torch.cat(parts)
        out[SDXL_TEXT_2 + "logit_scale"] = torch.tensor(4.6052)
    return {k: v.detach().contiguous() for k, v in out.items()}
