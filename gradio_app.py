"""STD style transfer in the browser: ``python gradio_app.py --models-dir /path/to/ComfyUI/models --base <checkpoint>``.

Tabs: Image, Video, Compare (teacher many-step vs STD few-step), One-step (SiD-LSG). ``--tiny`` builds tiny random
models in-process, so the whole app runs on a CPU with no downloads (what the tests use). Serves on 127.0.0.1 unless
``--listen``; ``--auth USER:PASS`` (or ``--auth-file``) asks for a login. The app reads only files uploaded to it.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local, offline-capable app: no usage pings

import gradio as gr  # noqa: E402

from comfyui_std.core import STDInputError  # noqa: E402
from comfyui_std.core.argv import parse_args as parse_argv  # noqa: E402
from comfyui_std.core.noise import NOISE_MODES  # noqa: E402
from std_app.handlers import CheckedBlocks, Limits, StyleApp  # noqa: E402
from std_app.engine import NO_MOTION  # noqa: E402
from std_app.models import NO_LORA  # noqa: E402
from std_app.settings import DEFAULTS, declared, start_strength_for  # noqa: E402
from std_app.cli import add_model_arguments, bounded, model_options  # noqa: E402
from std_app.startup import load_engine  # noqa: E402

TITLE = "STD style transfer"
GPU = "gpu"  # one concurrency group: every event that runs the model shares one worker
IMAGE_HEIGHT = 260
RESULT_HEIGHT = 480


MAX_FRAMES_LIMIT = 100_000
DEFAULT_MAX_FRAMES = 1800


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number: use 1-65535")
    return value


_frames = bounded(int, 1, MAX_FRAMES_LIMIT, "a whole number of frames")


def parse_credential(text: str, where: str = "") -> tuple[str, str]:
    """``USER:PASS`` (split at the first colon, so the password may hold colons) as a (user, password) pair."""
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password:
        raise argparse.ArgumentTypeError(f"{where}expected USER:PASSWORD with a non-empty user and password")
    return user.strip(), password


def _credential(text: str) -> tuple[str, str]:
    return parse_credential(text)


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """One ``user:password`` per line (blank lines and ``#`` comments skipped); raises ``ArgumentTypeError``."""
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"'{path}' " + ("is a folder, not a file" if path.is_dir() else
                                                         "does not exist"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError(f"'{path}' is not UTF-8 text") from None
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read '{path}': {err.strerror or err}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            pairs.append(parse_credential(line, f"'{path}' line {number}: "))
    if not pairs:
        raise argparse.ArgumentTypeError(f"'{path}' has no user:password line")
    return pairs


def check_output_dir(path: Path) -> str | None:
    """Why results cannot be written to ``path`` (created if missing), or None when they can."""
    if path.exists() and not path.is_dir():
        return f"'{path}' is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".std-write-check-"):
            pass
    except OSError as err:
        return f"cannot write to '{path}': {err.strerror or err}"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: a bad value ends in ``error: ...`` and exit code 2 (the output folder is checked
    by :func:`main`, which creates it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    r = p.add_argument_group("runtime")
    r.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where results are written (created; "
                                                                         "default: outputs)")
    r.add_argument("--max-frames", type=_frames, default=DEFAULT_MAX_FRAMES,
                   help=f"most video frames stylized per run (default {DEFAULT_MAX_FRAMES}: a minute at 30 fps; videos "
                        "are streamed, so memory does not grow with the length)")
    s = p.add_argument_group("server")
    s.add_argument("--port", type=_port, default=7860, help="default 7860")
    s.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (all interfaces) instead of 127.0.0.1")
    s.add_argument("--share", action="store_true", help="also open a public *.gradio.live link")
    s.add_argument("--auth", type=_credential, action="append", default=[], metavar="USER:PASS",
                   help="ask for this login (repeatable); use it with --listen or --share")
    s.add_argument("--auth-file", type=Path, help="logins from a file: one user:password per line (# comments)")
    args = parse_argv(p, argv)
    if args.auth_file is not None:
        try:
            args.auth = args.auth + read_auth_file(args.auth_file)
        except argparse.ArgumentTypeError as err:
            p.error(f"argument --auth-file: {err}")
    return args


# UI ---------------------------------------------------------------------------------------------------------------
def banner(app: StyleApp) -> str:
    """What is loaded: base, STD LoRAs by kind and η, SiD-LSG one-step LoRAs, the style reference."""
    e = app.engine
    etas, untagged, onestep = {}, {}, []
    for entry in e.catalog.entries.values():
        if entry.kind == "onestep":
            onestep.append(f"{entry.name} (t_init {entry.t_init})")
        elif entry.eta is None:
            untagged[entry.kind] = untagged.get(entry.kind, 0) + 1
        else:
            etas.setdefault(entry.kind, []).append(entry.eta)
    parts = []
    for kind in sorted(set(etas) | set(untagged)):
        text = f"{kind} η " + "/".join(f"{v:g}" for v in sorted(set(etas[kind]))) if kind in etas else kind
        if untagged.get(kind):
            text += f" (+{untagged[kind]} without a recorded η)"
        parts.append(text)
    loras = "; ".join(parts) or "none (base model only)"
    style = e.style or "off (no IP-Adapter loaded)"
    one = ", ".join(sorted(onestep)) or "none"
    return (f"**Base** {e.base_label} ({e.arch.upper()}, {e.device}) · **STD LoRAs** {loras} · "
            f"**One-step (SiD-LSG)** {one} · **Style reference** {style}")


def setting_control(name: str, component=None, **overrides):
    """The control of a declared setting (:mod:`std_app.settings`): label, help (as ``info``), default value and, for
    a slider, its limits and step from the declaration; a setting with choices is a dropdown unless ``component``
    says otherwise (``gr.Radio``). ``overrides`` adds or replaces component arguments (``elem_id``, ``value``)."""
    spec = declared()[name]
    options = dict(label=spec.label, info=spec.help, value=spec.default)
    if spec.choices is not None:
        component = component or gr.Dropdown
        options["choices"] = list(spec.choices)
    elif spec.slider is not None:
        component = component or gr.Slider
        options["minimum"], options["maximum"], options["step"] = spec.slider
    elif spec.kind in (int, float):  # a number box: open-ended above (the check refuses values past the limit)
        component = component or gr.Number
        options.update(minimum=spec.low, precision=0 if spec.kind is int else None)
    else:
        component = component or gr.Textbox
    options.update(overrides)
    return component(**options)


def settings_controls(app: StyleApp, kind: str, tab: str) -> dict:
    """The controls every tab shares, by name (Advanced accordion included); the handlers take them by these names."""
    catalog, limits = app.engine.catalog, app.limits
    default = catalog.default(kind)
    eta = start_strength_for(catalog.get(default))
    c = {}
    c["prompt"] = setting_control("prompt", lines=2)
    c["negative_prompt"] = setting_control("negative_prompt", lines=1)
    c["lora"] = setting_control("lora", gr.Dropdown, choices=catalog.choices(kind) + [NO_LORA],
                                value=default or NO_LORA)
    c["start_strength"] = setting_control("start_strength", value=eta)
    c["nfe"] = setting_control("nfe")
    c["gamma"] = setting_control("gamma")
    c["cfg"] = setting_control("cfg")
    with gr.Row():
        c["seed"] = setting_control("seed", elem_id=f"{tab}-seed")
        c["randomize_seed"] = gr.Checkbox(value=True, label="Randomize seed", elem_id=f"{tab}-randomize")
    c["output_size"] = gr.Slider(limits.min_size, limits.max_size, value=limits.default_size, step=8,
                                 label="Output size (long side, px)")
    c["plan_info"] = gr.Markdown(app.describe_plan(c["lora"].value, eta, True, DEFAULTS.nfe, DEFAULTS.plan),
                                 label="plan")
    with gr.Accordion("Advanced", open=False):
        c["snap_eta"] = gr.Checkbox(value=True, label="Snap η to the LoRA",
                                    info="Run the η the LoRA was trained for (warns when the slider differs)")
        c["plan"] = setting_control("plan", gr.Radio)
        c["style_preset"] = setting_control("style_preset")
        c["style_weight"] = setting_control("style_weight")
        c["lora_scale"] = setting_control("lora_scale")
    return c


def input_names(handler) -> tuple[str, ...]:
    """The inputs of a handler, in the order Gradio passes them (its API's parameters): its parameters, less the
    progress tracker Gradio fills in itself."""
    return tuple(name for name, p in inspect.signature(handler).parameters.items()
                 if name != "self" and not isinstance(p.default, gr.Progress))


#: the Image tab's settings, in its endpoint's order (its inputs after the content and style images)
SETTINGS_ORDER = input_names(StyleApp.stylize_image)[2:]


def inputs_for(handler, components: dict) -> list:
    """The components to wire to ``handler``, matched to its parameters by name (a missing one is a KeyError at
    start-up, not a shifted argument)."""
    return [components[name] for name in input_names(handler)]


def wire_plan_preview(app: StyleApp, c: dict, api_name: str | None) -> None:
    """Keep the "will run" line current and move η to a newly chosen LoRA's trained η."""
    inputs = inputs_for(app.describe_plan, c)
    c["lora"].change(app.lora_eta, c["lora"], c["start_strength"], queue=False, api_visibility="private")
    for i, comp in enumerate(inputs):
        public = api_name is not None and i == 0
        comp.change(app.describe_plan, inputs, c["plan_info"], queue=False, show_progress="hidden", preprocess=False,
                    api_name=api_name if public else None, api_visibility="public" if public else "private")


def gpu_event(app: StyleApp, button: gr.Button, fn, components: dict, outputs: list, api_name: str,
              info: gr.Markdown) -> None:
    """A model run: one shared worker; the progress (and a failure's red badge) shows on the result only, so the
    seed box keeps its value; after a failure the run info shows the error (toasts vanish). ``components``: the
    inputs by the handler's parameter names (:func:`inputs_for`)."""
    event = button.click(fn, inputs_for(fn, components), outputs, api_name=api_name, preprocess=False,
                         concurrency_limit=1, concurrency_id=GPU, show_progress_on=[outputs[0]])
    event.failure(app.last_error, None, info, queue=False, show_progress="hidden", api_visibility="private")


def check_on_upload(component, check, info: gr.Markdown) -> None:
    """Say at once (toast + run info) whether an upload can be used, instead of only when Stylize fails; an upload
    that cannot be used is removed again (no broken preview is left behind)."""
    component.upload(check, component, [info, component], preprocess=False, show_progress="hidden",
                     api_visibility="private")


def image_input(label: str, **kwargs) -> gr.Image:
    return gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], height=IMAGE_HEIGHT, **kwargs)


def image_tab(app: StyleApp) -> None:
    with gr.Row():
        with gr.Column():
            with gr.Row():
                content = image_input("Content image", elem_id="image-content")
                style = image_input("Style reference (optional)", elem_id="image-style")
            run = gr.Button("Stylize", variant="primary", elem_id="image-run")
            c = settings_controls(app, "i2i", "image")
        with gr.Column():
            result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                              buttons=["download", "fullscreen"], height=RESULT_HEIGHT, elem_id="image-result")
            info = gr.Markdown(label="run info", elem_id="image-info")
            download = gr.File(label="Download (PNG with the settings in its metadata)")
    wire_plan_preview(app, c, "plan")
    check_on_upload(content, app.check_content, info)
    check_on_upload(style, app.check_style, info)
    gpu_event(app, run, app.stylize_image, dict(c, content=content, style=style),
              [result, download, info, c["seed"]], "stylize_image", info)


def video_tab(app: StyleApp) -> None:
    with gr.Row():
        with gr.Column():
            with gr.Row():
                content = gr.Video(label="Content video", sources=["upload"], height=IMAGE_HEIGHT,
                                   elem_id="video-content")
                style = image_input("Style reference (optional)")
            run = gr.Button("Stylize video", variant="primary", elem_id="video-run")
            c = settings_controls(app, "v2v", "video")
            with gr.Accordion("Video", open=False):
                fpb = gr.Slider(1, 64, value=16, step=1, label="Frames per batch", info="bounds peak memory")
                overlap = gr.Slider(0, 32, value=0, step=1, label="Overlap (frames cross-faded between batches)")
                noise = gr.Radio(list(NOISE_MODES), value="shared", label="Noise",
                                 info="shared: every frame gets the same noise (temporally consistent)")
                cap = gr.Slider(0, app.limits.max_frames, value=min(48, app.limits.max_frames), step=1,
                                label="Frame load cap (0 = up to the app's limit)")
                nth = gr.Slider(1, 10, value=1, step=1, label="Select every nth frame")
                modules = app.engine.motion_modules()
                motion = gr.Dropdown(modules + [NO_MOTION], value=modules[0] if modules else NO_MOTION,
                                     label="Motion module", interactive=bool(modules), elem_id="video-motion",
                                     info="each batch runs as one clip through it, as the v2v LoRAs were trained "
                                          "(files of models/animatediff_models)" if modules else
                                          "start the app with --motion-module to run videos as the v2v LoRAs "
                                          "were trained")
        with gr.Column():
            result = gr.Video(label="Result", interactive=False, height=RESULT_HEIGHT)
            info = gr.Markdown(label="run info", elem_id="video-info")
            download = gr.File(label="Download (mp4 and the settings as JSON)", file_count="multiple")
    wire_plan_preview(app, c, None)
    check_on_upload(content, app.check_video, info)
    check_on_upload(style, app.check_style, info)
    gpu_event(app, run, app.stylize_video,
              dict(c, video=content, style=style, frames_per_batch=fpb, overlap=overlap, noise=noise,
                   frame_load_cap=cap, select_every_nth=nth, motion_module=motion),
              [result, download, info, c["seed"]], "stylize_video", info)


def compare_tab(app: StyleApp) -> None:
    with gr.Row():
        with gr.Column():
            with gr.Row():
                content = image_input("Content image")
                style = image_input("Style reference (optional)")
            run = gr.Button("Compare", variant="primary", elem_id="compare-run")
            teacher_steps = gr.Slider(1, 50, value=20, step=1, label="Teacher steps (base model, DDIM)")
            c = settings_controls(app, "i2i", "compare")
        with gr.Column():
            with gr.Row():
                teacher = gr.Image(label="Teacher (many steps)", type="filepath", format="png", interactive=False,
                                   height=RESULT_HEIGHT)
                student = gr.Image(label="STD (few steps)", type="filepath", format="png", interactive=False,
                                   height=RESULT_HEIGHT)
            info = gr.Markdown(label="run info", elem_id="compare-info")
    wire_plan_preview(app, c, None)
    check_on_upload(content, app.check_content, info)
    check_on_upload(style, app.check_style, info)
    gpu_event(app, run, app.compare, dict(c, content=content, style=style, teacher_steps=teacher_steps),
              [teacher, student, info, c["seed"]], "compare", info)


def onestep_tab(app: StyleApp) -> None:
    loras = app.engine.catalog.choices("onestep")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a lighthouse on a cliff at dusk, oil painting")
            lora = gr.Dropdown(loras, value=loras[0] if loras else None, label="SiD-LSG one-step LoRA",
                               info="Trained with python -m training.sid_lsg (one network evaluation per image).")
            with gr.Row():
                seed = setting_control("seed")
                randomize = gr.Checkbox(value=True, label="Randomize seed")
            with gr.Row():
                width = gr.Slider(app.limits.min_size, app.limits.max_size, value=min(512, app.limits.max_size),
                                  step=8, label="Width")
                height = gr.Slider(app.limits.min_size, app.limits.max_size, value=min(512, app.limits.max_size),
                                   step=8, label="Height")
            batch = gr.Slider(1, 8, value=1, step=1, label="Images")
            run = gr.Button("Generate", variant="primary", elem_id="onestep-run")
        with gr.Column():
            gallery = gr.Gallery(label="One-step images", height=RESULT_HEIGHT)
            info = gr.Markdown(label="run info", elem_id="onestep-info")
            download = gr.File(label="Download (PNGs with the settings in their metadata)", file_count="multiple")
    gpu_event(app, run, app.one_step,
              dict(prompt=prompt, lora=lora, seed=seed, randomize_seed=randomize, width=width, height=height,
                   batch_size=batch), [gallery, download, info, seed], "one_step", info)


def build_demo(app: StyleApp) -> gr.Blocks:
    """The whole UI around a :class:`StyleApp`; the queue has one worker for everything that runs the model."""
    with CheckedBlocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nFew-step style transfer with Single Trajectory Distillation (arXiv 2412.18945).")
        gr.Markdown(banner(app), elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Image"):
                image_tab(app)
            with gr.Tab("Video"):
                video_tab(app)
            with gr.Tab("Compare"):
                compare_tab(app)
            with gr.Tab("One-step"):
                onestep_tab(app)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, app: StyleApp, **kwargs):
    """Start the server; results are served from the app's output folder only.

    Gradio's own start-up lines are off (``quiet``): its "set `share=True` in `launch()`" hint would contradict
    this app's ``--share`` flag; :func:`main` prints the address and the flags instead.
    """
    app.output_dir.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("quiet", True)
    return demo.launch(allowed_paths=[str(app.output_dir.resolve())], max_file_size="500mb", **kwargs)


def server_options(args: argparse.Namespace) -> dict:
    """127.0.0.1 unless --listen; a public link only with --share; a login with --auth / --auth-file."""
    options = {"server_name": "0.0.0.0" if args.listen else "127.0.0.1", "server_port": args.port,
               "share": args.share}
    if args.auth:
        options["auth"] = list(args.auth)
    return options


def exposure_warning(args: argparse.Namespace) -> str | None:
    """The warning for serving beyond this machine without a login."""
    if args.auth or not (args.listen or args.share):
        return None
    where = " and ".join(w for w, on in (("every network interface (--listen)", args.listen),
                                         ("a public gradio.live link (--share)", args.share)) if on)
    return (f"warning: serving on {where} with no login: anyone who can reach it can run the model on this "
            "machine. Add --auth USER:PASS or --auth-file FILE.")


def address_lines(args: argparse.Namespace, demo: gr.Blocks) -> list[str]:
    host = "0.0.0.0 (all interfaces)" if args.listen else "127.0.0.1 (this machine only)"
    lines = [f"STD app on http://127.0.0.1:{args.port}/ (serving {host})"]
    if args.share:
        lines.append(f"public link: {demo.share_url}" if demo.share_url else
                     "public link: could not be created (see the message above); the local address works")
    else:
        lines.append("add --listen to serve your network, --share for a public link (with --auth)")
    if args.auth:
        lines.append(f"login required ({len(args.auth)} user{'s' if len(args.auth) > 1 else ''})")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_output_dir(args.output_dir)  # here, not in parse_args: it creates the folder
    if problem:
        print(f"error: argument --output-dir: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests are not news
    from std_hf.quiet import quiet_libraries

    quiet_libraries(args.verbose)
    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr)
    from comfyui_std.core.exits import Stopped, received, stop_on_signals

    with tempfile.TemporaryDirectory(prefix="std-tiny-") as scratch:  # --tiny's models, removed on every exit
        try:
            with stop_on_signals():
                code = serve(args, model_options(args, Path(scratch) if args.tiny else None), warning)
                stop = received()  # Gradio's server loop catches the stop itself
        except Stopped as caught:
            stop = caught
        if stop is None:
            return code
        print(f"stopped ({stop.name})", file=sys.stderr)
        return stop.exit_code


def serve(args: argparse.Namespace, options, warning: str | None) -> int:
    """Load the models and serve until stopped."""
    try:
        engine = load_engine(options)
    except STDInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    app = StyleApp(engine, args.output_dir, Limits.for_engine(engine, args.max_frames))
    demo = build_demo(app)
    try:
        launch(demo, app, prevent_thread_lock=True, **server_options(args))
    except OSError as err:  # Gradio: "Cannot find empty port in range: ..."
        print(f"error: cannot serve on port {args.port}: {err}. Pick another with --port.", file=sys.stderr)
        return 2
    print("\n".join(address_lines(args, demo)), flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
