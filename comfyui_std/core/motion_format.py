"""Motion modules (AnimateDiff family) and the motion part of STD v2v LoRAs: layouts, detection, key mapping.

STD's video LoRAs were distilled with a motion module in teacher and student (diffusers' ``UNetMotionModel``), and a
v2v LoRA carries LoRA factors on the motion modules' linear layers too, named by diffusers' motion-model paths
(``unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight``, as the official training and
``training.std`` write them). This module knows the three layouts motion modules come in and maps between them;
pure torch, so the app (diffusers), the trainer and the ComfyUI node (AnimateDiff-Evolved) share it.

Layouts (``MotionInfo.layout``):

* ``animatediff``: the original AnimateDiff files (``mm_sd_v15_v2.ckpt``, ``v3_sd15_mm.ckpt``,
  ``mm_sdxl_v10_beta.ckpt``): ``down_blocks.{i}.motion_modules.{j}.temporal_transformer.`` + ``norm``, ``proj_in``,
  ``transformer_blocks.0.attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0,pos_encoder.pe}``,
  ``transformer_blocks.0.norms.{0,1}``, ``ff.net.{0.proj,2}``, ``ff_norm``, ``proj_out``; the same under
  ``up_blocks`` and (v2) ``mid_block``. AnimateDiff-Evolved keeps this layout in memory for every format.
* ``hotshotxl``: Hotshot-XL (``hsxl_temporal_layers.safetensors``): ``temporal_attentions.{j}.`` where AnimateDiff
  has ``motion_modules.{j}.temporal_transformer.``, and ``pos_encoder.positional_encoding`` for ``pos_encoder.pe``.
* ``diffusers``: a ``MotionAdapter`` (``motion_modules.{j}.`` + ``norm``, ``proj_in``, ``transformer_blocks.0.`` +
  ``attn1``/``attn2`` (the two attention blocks), ``norm1``/``norm2``/``norm3`` (``norms.0``/``norms.1``/``ff_norm``),
  ``pos_embed.pe`` (one positional table per transformer block, where the other layouts store the same table once
  per attention block), ``ff``, ``proj_out``).

The base is read from the tensors: four down blocks are SD1.5, three SDXL (as AnimateDiff-Evolved decides); the
positional table's length is the module's longest context (24 for Hotshot-XL and AnimateDiff v1, 32 for v2/v3 and
AnimateDiff-SDXL). Attention heads (8) and GroupNorm groups (32) are not in the tensors; every module of the family
uses those values.

One difference between the implementations matters for results and is not a layout question: diffusers'
``UNetMotionModel`` (what STD was trained with) group-normalises a motion module's input over all frames of the clip
at once, AnimateDiff and AnimateDiff-Evolved frame by frame (:data:`NORM_ACROSS_FRAMES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import STDInputError

#: attention heads of every AnimateDiff-family motion module (not stored in the files)
MOTION_HEADS = 8
#: GroupNorm groups of every AnimateDiff-family motion module (not stored in the files)
MOTION_GROUPS = 32
#: how each implementation normalises a motion module's input: over the clip's frames together (diffusers, what STD
#: trained with) or per frame (AnimateDiff, AnimateDiff-Evolved)
NORM_ACROSS_FRAMES = {"diffusers": True, "animatediff-evolved": False}

BASES = {"sd15": "SD1.5", "sdxl": "SDXL"}
LAYOUTS = ("animatediff", "hotshotxl", "diffusers")

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")
_HSXL = re.compile(r"temporal_attentions\.(\d+)\.")
_MODULE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.")


@dataclass(frozen=True)
class MotionInfo:
    """What a motion module's tensors say about it."""
    layout: str              # animatediff | hotshotxl | diffusers
    base: str                # sd15 | sdxl
    max_frames: int          # length of its positional table: the longest context it can attend over
    mid_block: bool          # a motion module in the mid block (AnimateDiff v2)
    block_channels: tuple    # channels of the down blocks' motion modules
    layers_per_block: int    # motion modules per down block (up blocks have one more)
    tensors: int             # tensors in the file's motion part

    @property
    def default_context(self) -> int:
        """Frames per chunk by default: 8 for Hotshot-XL (its sweet spot), else 16 (AnimateDiff's)."""
        return min(self.max_frames, 8 if self.layout == "hotshotxl" else 16)

    def label(self) -> str:
        kind = {"animatediff": "AnimateDiff", "hotshotxl": "Hotshot-XL", "diffusers": "diffusers MotionAdapter"}
        return f"{kind[self.layout]} motion module for {BASES[self.base]} (context up to {self.max_frames} frames)"


def _layout(state_dict: dict) -> str:
    keys = list(state_dict)
    if any(k.endswith("pos_encoder.positional_encoding") or _HSXL.search(k) for k in keys):
        return "hotshotxl"
    if any(".temporal_transformer." in k for k in keys):
        return "animatediff"
    if any(".motion_modules." in k and ".transformer_blocks." in k for k in keys):
        return "diffusers"
    raise STDInputError("motion_module", "holds no motion-module tensors (no AnimateDiff, Hotshot-XL or diffusers "
                                         "MotionAdapter keys); is it an image LoRA or a checkpoint?")


def hotshot_to_animatediff(key: str) -> str:
    m = _HSXL.search(key)
    if m is None:
        return key
    key = key.replace(m.group(0), f"motion_modules.{m.group(1)}.temporal_transformer.", 1)
    return key.replace("pos_encoder.positional_encoding", "pos_encoder.pe")


_AD_TO_DIFFUSERS = ((".temporal_transformer.", "."), (".attention_blocks.0.", ".attn1."),
                    (".attention_blocks.1.", ".attn2."), (".norms.0.", ".norm1."), (".norms.1.", ".norm2."),
                    (".ff_norm.", ".norm3."))


def animatediff_to_diffusers(key: str) -> str:
    """An AnimateDiff-layout key (tensor or module path + '.') in diffusers' MotionAdapter naming."""
    for a, b in _AD_TO_DIFFUSERS:
        key = key.replace(a, b)
    return key


def diffusers_to_animatediff(path: str) -> str:
    """A diffusers motion-model module path (``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q``) in
    the AnimateDiff layout that AnimateDiff-Evolved's motion model uses."""
    m = _MODULE.match(path)
    if m is None:
        raise ValueError(f"not a motion-module path: {path}")
    head, rest = path[:m.end()], path[m.end():]
    rest = "." + rest + "."
    for a, b in _AD_TO_DIFFUSERS[1:]:
        rest = rest.replace(b, a)
    return head + "temporal_transformer" + rest[:-1]


def motion_part(state_dict: dict) -> dict:
    """The tensors of ``state_dict`` that belong to motion modules (a file may carry other things)."""
    return {k: v for k, v in state_dict.items()
            if "motion_modules." in k or "temporal_transformer." in k or "temporal_attentions." in k}


def to_diffusers(state_dict: dict) -> tuple[dict, MotionInfo]:
    """A motion module's tensors in diffusers' ``MotionAdapter`` naming, and what they say about it.

    Every tensor of the motion part is mapped (counted in ``MotionInfo.tensors``); the two positional tables of a
    transformer block in the AnimateDiff layouts must be equal (they are one table in diffusers), else the file is
    refused."""
    part = motion_part(state_dict)
    if not part:
        _layout(state_dict)  # raises the message about what the file is not
    layout = _layout(part)
    out: dict[str, torch.Tensor] = {}
    tables: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in part.items():
        k = hotshot_to_animatediff(key) if layout == "hotshotxl" else key
        if layout == "diffusers":
            out[k] = value
            continue
        if k.endswith("pos_encoder.pe"):  # ...attention_blocks.{0,1}.pos_encoder.pe -> ...pos_embed.pe
            block = re.sub(r"\.attention_blocks\.\d+\.pos_encoder\.pe$", ".pos_embed.pe", k)
            block = animatediff_to_diffusers(block)
            if block in tables and not torch.equal(tables[block][1], value):
                raise STDInputError("motion_module", f"the positional tables {tables[block][0]} and {key} differ; "
                                                     "this is not an AnimateDiff-family module this loader knows")
            tables[block] = (key, value)
            out[block] = value
            continue
        out[animatediff_to_diffusers(k)] = value
    return out, describe(out, layout, len(part))


def from_diffusers(diffusers_sd: dict, layout: str) -> dict:
    """A diffusers-named motion module in the ``animatediff`` or ``hotshotxl`` layout (each transformer block's
    positional table written for both attention blocks, as those files carry it)."""
    if layout not in ("animatediff", "hotshotxl"):
        raise ValueError(f"layout {layout!r}")
    out = {}
    for key, value in diffusers_sd.items():
        if key.endswith(".pos_embed.pe"):
            block = diffusers_to_animatediff(key[:-len(".pos_embed.pe")])
            keys = [f"{block}.attention_blocks.{i}.pos_encoder.pe" for i in (0, 1)]
        else:
            keys = [diffusers_to_animatediff(key.rsplit(".", 1)[0]) + "." + key.rsplit(".", 1)[1]]
        for k in keys:
            if layout == "hotshotxl":
                k = re.sub(r"motion_modules\.(\d+)\.temporal_transformer\.", r"temporal_attentions.\1.", k)
                k = k.replace("pos_encoder.pe", "pos_encoder.positional_encoding")
            out[k] = value.clone()
    return out


def describe(diffusers_sd: dict, layout: str, tensors: int) -> MotionInfo:
    """:class:`MotionInfo` of a motion module in diffusers naming (see :func:`to_diffusers`)."""
    down = {}
    for k, v in diffusers_sd.items():
        m = re.match(r"^down_blocks\.(\d+)\.motion_modules\.(\d+)\.proj_in\.weight$", k)
        if m:
            down.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            if int(m.group(2)) == 0:
                down[int(m.group(1)), "c"] = int(v.shape[0])
    blocks = sorted(b for b in down if isinstance(b, int))
    if not blocks or blocks != list(range(len(blocks))):
        raise STDInputError("motion_module", f"has motion modules in down blocks {blocks}: not a complete module")
    base = {4: "sd15", 3: "sdxl"}.get(len(blocks))
    if base is None:
        raise STDInputError("motion_module", f"has {len(blocks)} down blocks: neither an SD1.5 (4) nor an SDXL (3) "
                                             "motion module")
    tables = [v for k, v in diffusers_sd.items() if k.endswith("pos_embed.pe")]
    if not tables:
        raise STDInputError("motion_module", "has no positional table (pos_encoder.pe): AnimateLCM-style modules "
                                             "without one are not supported")
    return MotionInfo(layout=layout, base=base, max_frames=int(tables[0].shape[1]),
                      mid_block=any(k.startswith("mid_block.") for k in diffusers_sd),
                      block_channels=tuple(down[b, "c"] for b in blocks), layers_per_block=len(down[blocks[0]]),
                      tensors=tensors)


def adapter_config(info: MotionInfo, diffusers_sd: dict) -> dict:
    """diffusers ``MotionAdapter(**config)`` arguments that fit these tensors (heads and groups as the family uses;
    toy modules narrower than 32 channels get the largest group count dividing every width)."""
    import math

    groups = MOTION_GROUPS
    for c in info.block_channels:
        groups = math.gcd(groups, c)
    transformer_layers = len({m.group(1) for k in diffusers_sd
                              for m in [re.match(r"^down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\.", k)]
                              if m})
    mid_layers = len({m.group(1) for k in diffusers_sd for m in [re.match(r"^mid_block\.motion_modules\.(\d+)\.", k)]
                      if m})
    heads = MOTION_HEADS
    for c in info.block_channels:
        heads = math.gcd(heads, c)
    return dict(block_out_channels=info.block_channels, motion_layers_per_block=info.layers_per_block,
                motion_transformer_layers_per_block=transformer_layers or 1,
                motion_mid_block_layers_per_block=mid_layers or 1, motion_num_attention_heads=heads,
                motion_norm_num_groups=groups, motion_max_seq_length=info.max_frames,
                use_motion_mid_block=info.mid_block)


def check_base(info: MotionInfo, base: str, name: str, base_label: str) -> None:
    """Refuse a motion module made for the other base, naming both."""
    if info.base != base:
        raise STDInputError("motion_module", f"'{name}' is an {info.label()}, but the base model {base_label} is "
                                             f"{BASES.get(base, base)}; use a {BASES.get(base, base)} motion module")


# --------------------------------------------------------------------------------------------------------------------
# The motion part of a v2v LoRA

_PEFT = re.compile(r"\.(lora_A|lora_B)(?:\.default)?\.weight$")
_OLD = re.compile(r"\.lora(?:_linear_layer)?\.(down|up)\.weight$")
_KOHYA = re.compile(r"\.(lora_down|lora_up)\.weight$|\.alpha$")


@dataclass(frozen=True)
class MotionLoraLayer:
    down: torch.Tensor   # [rank, in]
    up: torch.Tensor     # [out, rank]
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """``strength · alpha/rank · up @ down`` in float32."""
        return (self.up.float() @ self.down.float()) * (self.scale * float(strength))


def motion_lora_layers(state_dict: dict, module_paths, alpha: float | None = None,
                       name: str = "the LoRA") -> dict[str, MotionLoraLayer]:
    """The motion-module LoRA layers of a (v2v) LoRA, by diffusers motion-model module path.

    Args:
        state_dict: the LoRA's tensors; only motion-module keys are read (PEFT ``lora_A``/``lora_B``, older diffusers
            ``lora.down``/``lora.up``, or kohya ``lora_unet_<path with _>.lora_down``/``lora_up``/``alpha``).
        module_paths: the motion model's linear module paths in diffusers naming (kohya names are resolved
            against them).
        alpha: alpha for the forms that do not store it (PEFT: the file's ``std.alpha``/``lora_alpha``); None =
            rank (scale 1).

    Raises STDInputError when a factor lacks its partner, or a kohya name matches no module.
    """
    known = {p.replace(".", "_"): p for p in module_paths}
    parts: dict[str, dict] = {}
    for key, value in state_dict.items():
        if "motion_modules" not in key:
            continue
        m = _PEFT.search(key) or _OLD.search(key)
        if m is not None:
            path = key[:m.start()]
            for pre in ("base_model.model.", "unet."):
                if path.startswith(pre):
                    path = path[len(pre):]
            role = "down" if m.group(1) in ("lora_A", "down") else "up"
        else:
            m = _KOHYA.search(key)
            if m is None or not key.startswith("lora_unet_"):
                raise STDInputError("lora", f"{name}: motion key {key} is in no LoRA format this loader reads")
            flat = key[len("lora_unet_"):m.start()]
            path = known.get(flat)
            if path is None:
                raise STDInputError("lora", f"{name}: motion key {key} names no layer of this motion module")
            role = {"lora_down": "down", "lora_up": "up"}.get(m.group(1), "alpha")
        parts.setdefault(path, {})[role] = value
    out = {}
    for path, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            missing = "up" if "down" in p else "down"
            raise STDInputError("lora", f"{name}: the motion layer {path} has no {missing} factor (a damaged file)")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise STDInputError("lora", f"{name}: the motion layer {path} has factors of shapes {list(down.shape)} "
                                        f"and {list(up.shape)}, which do not multiply")
        a = float(p["alpha"]) if "alpha" in p else (float(alpha) if alpha is not None else float(down.shape[0]))
        out[path] = MotionLoraLayer(down, up, a)
    return out


def check_motion_lora(layers: dict[str, MotionLoraLayer], weights: dict[str, tuple], name: str,
                      module_label: str) -> None:
    """Refuse motion LoRA layers that do not fit a motion model whose linear weights have these shapes
    (``{diffusers module path: (out, in)}``), naming the first misfits."""
    missing = [p for p in layers if p not in weights]
    wrong = [f"{p} ({list(layers[p].up.shape[:1]) + list(layers[p].down.shape[1:])} vs {list(weights[p])})"
             for p in layers if p in weights and (layers[p].up.shape[0], layers[p].down.shape[1]) != tuple(weights[p])]
    if missing or wrong:
        problems = [f"{len(missing)} layer(s) it lacks (e.g. {missing[0]})"] if missing else []
        problems += [f"{len(wrong)} of another size (e.g. {wrong[0]})"] if wrong else []
        raise STDInputError("lora", f"{name}: its {len(layers)} motion layers do not fit the {module_label}: "
                                    f"{'; '.join(problems)}. A v2v LoRA runs with the motion module it was trained "
                                    "with (the same base and layout)")


def lora_tensor_count(layers: dict[str, MotionLoraLayer]) -> int:
    """Tensors the layers came from (down and up per layer)."""
    return 2 * len(layers)
