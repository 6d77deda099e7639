"""The app's settings have one home (:mod:`std_app.settings`): the batch command line, the Gradio controls and the
checks are derived from the declaration, the run record has one builder, and the handlers get their inputs by name.

These tests fail when a setting's limit, default or flag is restated somewhere else, or when a front end drifts from
the declaration. No network, a tiny offline app (built once per module, about half a minute on a CPU).
"""

import ast
import dataclasses
import json
import math
import re
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

import gradio_app
from comfyui_std.core import STDInputError, STDPlan
from comfyui_std.core.plan import check_gamma, check_nfe, check_start_strength
from std_app import batch
from std_app.handlers import StyleApp
from std_app.media import run_record, save_png
from std_app.settings import DEFAULTS, MAX_SEED, StyleSettings, declared, from_arguments
from std_app.startup import load_engine, tiny_options

REPO = Path(__file__).resolve().parents[1]
APP_SOURCES = sorted((REPO / "std_app").glob("*.py")) + [REPO / "gradio_app.py"]
HOME = REPO / "std_app" / "settings.py"
SPECS = declared()

#: the public API as clients call it (positional order and names), pinned: it must not move with refactors
PUBLIC_API = {
    "/stylize_image": ["content", "style", "prompt", "negative_prompt", "lora", "start_strength", "snap_eta", "nfe",
                       "gamma", "cfg", "seed", "randomize_seed", "output_size", "plan", "style_preset",
                       "style_weight", "lora_scale"],
    "/stylize_video": ["video", "style", "prompt", "negative_prompt", "lora", "start_strength", "snap_eta", "nfe",
                       "gamma", "cfg", "seed", "randomize_seed", "output_size", "plan", "style_preset",
                       "style_weight", "lora_scale", "frames_per_batch", "overlap", "noise", "frame_load_cap",
                       "select_every_nth", "motion_module"],
    "/compare": ["content", "style", "prompt", "negative_prompt", "lora", "start_strength", "snap_eta", "nfe",
                 "teacher_steps", "gamma", "cfg", "seed", "randomize_seed", "output_size", "plan", "style_preset",
                 "style_weight", "lora_scale"],
    "/one_step": ["prompt", "lora", "seed", "randomize_seed", "width", "height", "batch_size"],
    "/plan": ["lora", "start_strength", "snap_eta", "nfe", "plan"],
}


def trees():
    for path in APP_SOURCES:
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def where(path, node) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


# One declaration ---------------------------------------------------------------------------------------------------
def test_the_limits_are_the_ones_the_app_has_always_had():
    limits = {name: (s.low, s.high, s.low_open) for name, s in SPECS.items() if s.low is not None}
    assert limits == {"start_strength": (0.0, 1.0, True), "nfe": (1, 50, False), "gamma": (0.0, 1.0, False),
                      "cfg": (0.0, 30.0, False), "seed": (0, 2 ** 63 - 1, False), "style_weight": (0.0, 2.0, False),
                      "lora_scale": (0.0, 2.0, False)}
    assert MAX_SEED == 2 ** 63 - 1
    assert dataclasses.asdict(DEFAULTS) == dict(prompt="", negative_prompt="", lora=None, start_strength=0.75, nfe=8,
                                                gamma=0.0, cfg=6.0, seed=0, plan="official", style_preset="style",
                                                style_weight=1.0, lora_scale=1.0)


def test_no_setting_limit_flag_or_label_is_stated_outside_its_declaration():
    """A ``check_range("cfg", ...)``, an ``add_argument("--cfg", ...)``, a ``label="CFG scale"`` or a second
    ``2 ** 63 - 1`` anywhere in the app (std_app/, gradio_app.py) other than std_app/settings.py is a second home."""
    names = set(SPECS)
    flags = {s.flag for s in SPECS.values() if s.flag}
    labels = {s.label for s in SPECS.values()}
    found = []
    for path, tree in trees():
        if path == HOME:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                first = node.args[0].value
                if callee == "check_range" and first in names:
                    found.append(f"{where(path, node)}: check_range({first!r}, ...)")
                if callee == "add_argument" and first in flags:
                    found.append(f"{where(path, node)}: add_argument({first!r}, ...)")
            if (isinstance(node, ast.keyword) and node.arg == "label" and isinstance(node.value, ast.Constant)
                    and node.value.value in labels):
                found.append(f"{where(path, node)}: label={node.value.value!r}")
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and isinstance(node.right, ast.Constant)
                    and node.right.value == 63):
                found.append(f"{where(path, node)}: 2 ** 63")
    assert not found, "declared in std_app/settings.py, restated here:\n" + "\n".join(found)


def test_each_setting_is_declared_once():
    fields = [f.name for f in dataclasses.fields(StyleSettings)]
    assert fields == list(SPECS) and len(set(fields)) == len(fields)
    assert all("setting" in f.metadata for f in dataclasses.fields(StyleSettings))
    flags = [s.flag for s in SPECS.values() if s.flag]
    assert len(set(flags)) == len(flags)


def test_settings_are_built_by_name_only():
    with pytest.raises(TypeError):
        StyleSettings("an oil painting")  # the 12 positional arguments of old are refused
    for path, tree in trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "StyleSettings":
                assert not node.args, f"{where(path, node)}: StyleSettings(...) with positional arguments"


@pytest.mark.parametrize("name, check", [("nfe", check_nfe), ("start_strength", check_start_strength),
                                         ("gamma", check_gamma)])
def test_plan_limits_agree_with_the_core_checks(name, check):
    """nfe, η and gamma are also checked by the core (the plan, the nodes): the same values pass and fail, with the
    same messages."""
    spec = SPECS[name]
    step = 1 if spec.kind is int else 1e-6
    for value in (spec.low - step, spec.low, spec.low + step, spec.high - step, spec.high, spec.high + step,
                  float("nan"), "x"):
        try:
            expected = check(value)
        except STDInputError as err:
            with pytest.raises(STDInputError, match=re.escape(str(err))):
                spec.check(value)
        else:
            assert spec.check(value) == expected


# The checks --------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("name, spec", SPECS.items(), ids=list(SPECS))
def test_validated_checks_every_value_against_its_declaration(name, spec):
    good = StyleSettings(**{name: spec.default}).validated()
    assert getattr(good, name) == spec.default
    if spec.choices is not None:
        with pytest.raises(STDInputError, match=re.escape(f"{name}: got 'nope', choose one of "
                                                          f"{', '.join(spec.choices)}")):
            StyleSettings(**{name: "nope"}).validated()
        assert getattr(StyleSettings(**{name: ""}).validated(), name) == spec.default
    if spec.low is not None:
        step = 1 if spec.kind is int else 0.5
        lo, hi = ("(" if spec.low_open else "["), "]"
        for bad in (spec.low - step, spec.high + step):
            message = f"{name}: got {spec.kind(bad)}, allowed range is {lo}{spec.low}, {spec.high}{hi}"
            with pytest.raises(STDInputError, match=re.escape(message)):
                StyleSettings(**{name: bad}).validated()
        if spec.low_open:
            with pytest.raises(STDInputError, match=re.escape(f"{name}: got {spec.kind(spec.low)}")):
                StyleSettings(**{name: spec.low}).validated()
        assert getattr(StyleSettings(**{name: spec.high}).validated(), name) == spec.high


# The batch command line --------------------------------------------------------------------------------------------
def test_batch_flags_follow_the_declaration():
    parser = batch.build_parser()
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for name, spec in SPECS.items():
        action = actions[spec.flag]
        runtime = spec.default_help is not None
        assert action.default == (None if runtime else spec.default), spec.flag
        assert action.choices == (list(spec.choices) if spec.choices else None), spec.flag
        if spec.kind in (int, float) and spec.choices is None:
            assert action.type is spec.kind, spec.flag
        assert action.help.startswith(spec.help), spec.flag
    args = batch.parse_args(["x.png", "--output", "out"])
    values = from_arguments(args)
    assert values == {n: (None if s.default_help else s.default) for n, s in SPECS.items()}
    args = batch.parse_args(["x.png", "--output", "out", "--cfg", "4", "--use-lora", "a", "--style-weight", "0.5"])
    assert (args.cfg, args.use_lora, args.style_weight) == (4.0, "a", 0.5)


def test_batch_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        batch.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in SPECS.values():
        entry = text.split(f" {spec.flag} ", 1)[1].split(" --", 1)[0]
        assert entry.count("default") <= 1, (spec.flag, entry)
        if spec.default not in ("", None):
            assert "[default: " in entry, (spec.flag, entry)
    assert "[default: 8]" in text and "[default: 6]" in text and "[default: official]" in text


@pytest.mark.bad_input
@pytest.mark.parametrize("flag, value, message", [
    ("--cfg", "31", "cfg: got 31.0, allowed range is [0.0, 30.0]"),
    ("--seed", "-1", "seed: got -1, allowed range is [0, 9223372036854775807]"),
    ("--style-weight", "3", "style_weight: got 3.0, allowed range is [0.0, 2.0]"),
    ("--lora-scale", "-1", "lora_scale: got -1.0, allowed range is [0.0, 2.0]"),
    ("--gamma", "2", "gamma: got 2.0, allowed range is [0.0, 1.0]"),
    ("--nfe", "51", "nfe: got 51, allowed range is [1, 50]"),
    ("--start-strength", "0", "start_strength: got 0.0, allowed range is (0.0, 1.0]"),
])
def test_batch_refuses_out_of_range_settings_before_loading(tmp_path, flag, value, message):
    args = batch.parse_args([str(tmp_path), "--output", str(tmp_path / "out"), flag, value])
    with pytest.raises(batch.UsageError, match=re.escape(message)):
        batch.check_arguments(args)


# The Gradio controls -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    return StyleApp(load_engine(tiny_options("sd15", root / "models")), root / "outputs")


@pytest.fixture(scope="module")
def demo(app):
    return gradio_app.build_demo(app)


def endpoint(demo, api_name):
    return next(fn for fn in demo.fns.values() if fn.api_name == api_name)


def choices(component) -> list:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in component.choices]


def test_gradio_controls_follow_the_declaration(demo):
    """Every setting input of every endpoint: its label, help, default, slider limits and step, or choices are the
    declaration's (the η slider starts at the LoRA's η; the LoRA dropdown lists the loaded LoRAs)."""
    checked = 0
    for api_name in ("stylize_image", "stylize_video", "compare"):
        fn = endpoint(demo, api_name)
        names = PUBLIC_API[f"/{api_name}"]
        for name, component in zip(names, fn.inputs, strict=True):
            spec = SPECS.get(name)
            if spec is None:
                continue
            assert (component.label, component.info) == (spec.label, spec.help), (api_name, name)
            if name not in ("lora", "start_strength"):
                assert component.value == spec.default, (api_name, name)
            if spec.choices is not None:
                assert choices(component) == list(spec.choices), (api_name, name)
            if spec.slider is not None:
                assert isinstance(component, gr.Slider), (api_name, name)
                assert (component.minimum, component.maximum, component.step) == spec.slider, (api_name, name)
                low, high = spec.slider[:2]
                assert spec.low <= low and high <= spec.high, (api_name, name)  # inside the allowed range
            elif spec.kind in (int, float):
                assert isinstance(component, gr.Number) and component.minimum == spec.low, (api_name, name)
            checked += 1
    assert checked == 3 * len(SPECS)
    seed = endpoint(demo, "one_step").inputs[2]
    assert seed.label == SPECS["seed"].label and seed.minimum == SPECS["seed"].low


def test_handlers_get_their_inputs_by_name(app, demo):
    """The public API is unchanged, and each input is the control of the parameter with its name."""
    api = demo.get_api_info()["named_endpoints"]
    assert {k: [p["parameter_name"] for p in v["parameters"]] for k, v in api.items()} == PUBLIC_API
    handlers = {"stylize_image": app.stylize_image, "stylize_video": app.stylize_video, "compare": app.compare,
                "one_step": app.one_step, "plan": app.describe_plan}
    for api_name, handler in handlers.items():
        assert list(gradio_app.input_names(handler)) == PUBLIC_API[f"/{api_name}"]
        if api_name == "one_step":  # text-to-image: its own prompt and LoRA controls
            labels = [c.label for c in endpoint(demo, api_name).inputs]
            assert labels == ["Prompt", "SiD-LSG one-step LoRA", "Seed", "Randomize seed", "Width", "Height", "Images"]
            continue
        for name, component in zip(PUBLIC_API[f"/{api_name}"], endpoint(demo, api_name).inputs, strict=True):
            if name in SPECS:
                assert component.label == SPECS[name].label, (api_name, name)
    assert gradio_app.SETTINGS_ORDER == tuple(PUBLIC_API["/stylize_image"][2:])


def test_settings_are_read_by_name(app):
    settings, notices = app.settings(prompt="p", negative_prompt="n", lora="std_tiny_i2i_eta0.75", start_strength=0.6,
                                     snap_eta=False, nfe=3, gamma=0.25, cfg=2.5, seed=9, randomize_seed=False,
                                     plan="trained_start", style_preset="layout", style_weight=0.5, lora_scale=1.5)
    assert settings == StyleSettings(prompt="p", negative_prompt="n", lora="std_tiny_i2i_eta0.75", start_strength=0.6,
                                     nfe=3, gamma=0.25, cfg=2.5, seed=9, plan="trained_start", style_preset="layout",
                                     style_weight=0.5, lora_scale=1.5)
    assert len(notices) == 1 and "differs from the η 0.75" in notices[0]  # not snapped, as asked
    with pytest.raises(TypeError):
        app.settings("p", "n")  # by name only


# The run record ----------------------------------------------------------------------------------------------------
def test_one_run_record_builder():
    """No dict with the record's "settings" and "plan" keys is built anywhere but :func:`run_record`."""
    found = []
    for path, tree in trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "run_record":
                found.append(("builder", where(path, node)))
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if {"settings", "plan"} <= keys:
                    found.append(("dict", where(path, node)))
    assert [kind for kind, _ in found] == ["builder", "dict"], found
    assert found[1][1].startswith("std_app/media.py")


def test_the_run_record_keeps_its_fields(tmp_path):
    s = StyleSettings(prompt="an oil painting", nfe=4, lora="l", cfg=3.0).validated()
    plan = STDPlan((679, 579, 479, 379), 4, 0.75, "official")
    lora = type("Entry", (), {"name": "l"})()
    record = run_record(s, plan, (64, 48), base_model="tiny-sd15", lora=lora, style_used=True, frames=1,
                        seconds=1.23456)
    assert record == {"app": "std_app", "settings": dataclasses.asdict(s),
                      "plan": {"name": "official", "nfe": 4, "start_strength": 0.75, "start_timestep": 679,
                               "timesteps": [679, 579, 479, 379], "scheduler_steps": plan.scheduler_steps},
                      "size": "64x48", "base_model": "tiny-sd15", "lora": "l", "style": "style x1", "frames": 1,
                      "seconds": 1.235}
    video = run_record(s, plan, (64, 48), base_model="b", lora=None, style_used=False,
                       **{"fps": 12.0, "source": "clip.mp4", "app": "std_app.batch"})
    assert (video["app"], video["lora"], video["style"], video["fps"]) == ("std_app.batch", None, None, 12.0)
    assert "seconds" not in video
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "r.png", record)
    with Image.open(path) as im:
        assert json.loads(im.text["std"]) == record
        assert "CFG scale: 3.0" in im.text["parameters"] and math.isfinite(record["seconds"])


def test_only_the_content_or_prompt_is_required_in_the_api(demo):
    """Bug caught: the optional style image (and everything after it) marked required, so the obvious
    ``predict(handle_file(img), api_name="/stylize_image")`` fails."""
    api = demo.get_api_info()["named_endpoints"]
    required = {name: [p["parameter_name"] for p in v["parameters"] if not p["parameter_has_default"]]
                for name, v in api.items()}
    assert required == {"/stylize_image": ["content"], "/stylize_video": ["video"], "/compare": ["content"],
                        "/one_step": ["prompt"], "/plan": []}
