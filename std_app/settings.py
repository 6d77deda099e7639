"""The app's style settings, declared once: default, limits, choices, help text and control label of each.

Like the trainer's options (:mod:`training.common.config`), every setting is a dataclass field made by
:func:`setting`, and the front ends read its declaration (:func:`declared`) instead of restating it:

* :meth:`StyleSettings.validated` checks every value against its declared limits or choices, with the core's
  messages (``cfg: got 31.0, allowed range is [0.0, 30.0]``, ``plan: got 'x', choose one of official, ...``);
* :func:`add_arguments` / :func:`from_arguments` derive the flags of ``python -m std_app.batch`` (``--cfg 4``,
  ``--use-lora NAME``, ...) and read them back by name;
* ``gradio_app.setting_control`` derives the Gradio controls (slider limits and step, value, label, info).

The limits of ``nfe``, ``start_strength`` and ``gamma`` are those of the core's plan checks
(:mod:`comfyui_std.core.plan`), which the tests hold them to. The ComfyUI nodes declare their own inputs
(:mod:`comfyui_std.nodes.common`): the node pack never imports the app.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from comfyui_std.core import PLANS, STDInputError, check_range
from comfyui_std.core.plan import ORIGIN_STEPS
from comfyui_std.core.style_blocks import PRESET_NAMES

MAX_SEED = 2 ** 63 - 1


#: the longest text setting (a prompt): CLIP reads 77 tokens, so more is a pasted file, not a prompt
MAX_TEXT = 4096


def check_text(name: str, value) -> str:
    """A text setting: a string (None is empty) of valid Unicode (bytes that were not UTF-8 on the command line
    arrive as lone surrogates) of at most :data:`MAX_TEXT` characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise STDInputError(name, f"expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise STDInputError(name, f"is not valid UTF-8 text (at character {err.start}); write it in UTF-8") from None
    if len(value) > MAX_TEXT:
        raise STDInputError(name, f"is {len(value)} characters long; at most {MAX_TEXT} (the text encoder reads 77 "
                                  "tokens)")
    return value


@dataclass(frozen=True)
class Spec:
    """The declaration of one setting (the metadata of its :class:`StyleSettings` field)."""

    name: str
    default: object
    help: str
    label: str                      # the Gradio control's label
    kind: type | None               # int, float or str; None: passed through unchecked (checked by its user)
    low: float | int | None = None  # the allowed range [low, high] ((low, high] with low_open)
    high: float | int | None = None
    low_open: bool = False
    step: float | int | None = None  # the slider step (a number without one is a number box)
    ui_range: tuple | None = None    # the part of the range a slider covers, when not all of it
    choices: tuple[str, ...] | None = None
    flag: str | None = None          # the batch command line's flag
    metavar: str | None = None
    default_help: str | None = None  # the default as --help states it ("{default}": the declared one), when it is
                                     # chosen at run time (the flag's default is then None)

    def check(self, value):
        """``value`` checked against the declaration and converted (raises :class:`STDInputError` naming it)."""
        if self.choices is not None:
            value = value or self.default  # an empty choice (a cleared dropdown) is the default
            if value not in self.choices:
                raise STDInputError(self.name, f"got {value!r}, choose one of {', '.join(self.choices)}")
            return value
        if self.kind is None:
            return value
        if self.kind is str:
            return check_text(self.name, value)
        return check_range(self.name, value, self.low, self.high, low_open=self.low_open, kind=self.kind)

    @property
    def slider(self) -> tuple | None:
        """(minimum, maximum, step) of the Gradio slider, or None when the setting is not a slider."""
        if self.step is None:
            return None
        low, high = self.ui_range or (self.low, self.high)
        return low, high, self.step


def setting(default, help: str, *, label: str, kind: type | None = ..., low=None, high=None, low_open=False,
            step=None, ui_range=None, choices=None, flag=..., metavar=None, default_help=None):
    """A :class:`StyleSettings` field and its declaration. ``kind`` defaults to the default's type; ``flag`` to
    ``--name-with-dashes`` (``None``: not on the command line)."""
    spec = dict(default=default, help=help, label=label, kind=type(default) if kind is ... else kind, low=low,
                high=high, low_open=low_open, step=step, ui_range=ui_range,
                choices=tuple(choices) if choices is not None else None, flag=flag, metavar=metavar,
                default_help=default_help)
    return dataclasses.field(default=default, metadata={"setting": spec})


@dataclass(kw_only=True)
class StyleSettings:
    """Everything that decides an STD run besides the content and the style image (built by name only)."""

    prompt: str = setting("", "The target style, e.g. 'an oil painting, thick impasto brush strokes'.",
                          label="Prompt (the target style)")
    negative_prompt: str = setting("", "What the result should not look like (used when cfg > 1).",
                                   label="Negative prompt")
    lora: str | None = setting(None, "The STD LoRA to run, by name (file stem; 'none' = the base model). The model zoo "
                                     "has one LoRA per η: i2i for images, v2v for videos.",
                               label="STD LoRA", kind=None, flag="--use-lora", metavar="NAME",
                               default_help="the i2i LoRA nearest η 0.75 for images, the v2v one for videos")
    start_strength: float = setting(0.75, "How far the content is noised: higher stylizes more, lower keeps more "
                                          "content. Snapped to the LoRA's trained η unless snapping is off.",
                                    label="Start strength η", low=0.0, high=1.0, low_open=True, step=0.01,
                                    ui_range=(0.05, 1.0), default_help="the LoRA's trained η, else {default:g}")
    nfe: int = setting(8, "Sampler steps (network evaluations per frame).", label="NFE (sampler steps)",
                       low=1, high=ORIGIN_STEPS, step=1)
    gamma: float = setting(0.0, "Per-step stochasticity: 0 = deterministic, what the official STD inference runs. "
                                "Not η.", label="Gamma (per-step stochasticity)", low=0.0, high=1.0, step=0.05)
    cfg: float = setting(6.0, "Classifier-free guidance scale; 1 disables the negative branch.", label="CFG scale",
                         low=0.0, high=30.0, step=0.1, ui_range=(0.0, 15.0))  # the slider: the useful part
    seed: int = setting(0, "Seed of the noise.", label="Seed", low=0, high=MAX_SEED)
    plan: str = setting("official", "official: the timesteps of the official STD inference; trained_start: start "
                                    "exactly where the LoRA was trained to start.", label="Plan", choices=PLANS)
    style_preset: str = setting("style", "The UNet blocks the style reference (IP-Adapter) acts on.",
                                label="Style blocks (IP-Adapter)", choices=PRESET_NAMES)
    style_weight: float = setting(1.0, "Weight of the style reference.", label="Style reference weight",
                                  low=0.0, high=2.0, step=0.05)
    lora_scale: float = setting(1.0, "Strength of the STD LoRA.", label="LoRA strength", low=0.0, high=2.0,
                                step=0.05)

    def validated(self) -> "StyleSettings":
        """A copy with every field checked against its declaration and converted (raises :class:`STDInputError`
        naming the field)."""
        return StyleSettings(**{name: spec.check(getattr(self, name)) for name, spec in declared().items()})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def declared() -> Mapping[str, Spec]:
    """Every setting's declaration, by name, in the order of the fields (the order of the controls and flags)."""
    return _DECLARED


def _declarations() -> dict[str, Spec]:
    out = {}
    for f in dataclasses.fields(StyleSettings):
        spec = dict(f.metadata["setting"])
        if spec["flag"] is ...:
            spec["flag"] = "--" + f.name.replace("_", "-")
        out[f.name] = Spec(name=f.name, **spec)
    return out


_DECLARED = MappingProxyType(_declarations())
DEFAULTS = StyleSettings()


def start_strength_for(entry) -> float:
    """The η a run with LoRA ``entry`` starts from by default: the η it was trained for, else the declared
    default."""
    eta = getattr(entry, "eta", None)
    return DEFAULTS.start_strength if eta is None else eta


# Command line -----------------------------------------------------------------------------------------------------
def _dest(spec: Spec) -> str:
    return spec.flag.lstrip("-").replace("-", "_")


def _shown(spec: Spec) -> str | None:
    if spec.default_help is not None:
        return spec.default_help.format(default=spec.default)
    if spec.default in (None, ""):
        return None
    return f"{spec.default:g}" if isinstance(spec.default, float) else str(spec.default)


def add_arguments(parser) -> None:
    """One flag per declared setting, added to ``parser`` (a parser or an argument group) in declaration order: its
    type, default, choices and help, with the default stated once (``[default: 8]``, as the trainer's flags)."""
    for spec in declared().values():
        if spec.flag is None:
            continue
        shown = _shown(spec)
        options = dict(dest=_dest(spec), default=None if spec.default_help is not None else spec.default,
                       help=spec.help + (f" [default: {shown}]" if shown is not None else ""))
        if spec.choices is not None:
            options["choices"] = list(spec.choices)
        elif spec.kind in (int, float):
            options["type"] = spec.kind
        if spec.metavar:
            options["metavar"] = spec.metavar
        parser.add_argument(spec.flag, **options)


def from_arguments(args: argparse.Namespace) -> dict:
    """The settings the flags of :func:`add_arguments` give, by setting name (``None`` where the flag's default is
    chosen at run time: ``lora``, ``start_strength``)."""
    return {name: getattr(args, _dest(spec)) for name, spec in declared().items() if spec.flag is not None}
