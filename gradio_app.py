"""STD style transfer in the browser: ``python gradio_app.py --models-dir /path/to/ComfyUI/models --base <checkpoint>``.

Tabs: Image, Video, Compare (teacher many-step vs STD few-step). ``--tiny`` builds tiny random models in-process,
so the whole app runs on a CPU with no downloads (what the tests use). Serves on 127.0.0.1 unless ``--listen``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local, offline-capable app: no usage pings

import gradio as gr  # noqa: E402

from comfyui_std.core import PLANS, STDInputError  # noqa: E402
from comfyui_std.core.pipeline import NOISE_MODES  # noqa: E402
from comfyui_std.core.style_blocks import PRESET_NAMES  # noqa: E402
from std_app.handlers import Limits, StyleApp  # noqa: E402
from std_app.models import NO_LORA  # noqa: E402
from std_app.cli import add_model_arguments, model_options  # noqa: E402
from std_app.startup import load_engine  # noqa: E402

TITLE = "STD style transfer"
GPU = "gpu"  # one concurrency group: every event that runs the model shares one worker
IMAGE_HEIGHT = 260
RESULT_HEIGHT = 480


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    r = p.add_argument_group("runtime")
    r.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where results are written")
    r.add_argument("--max-frames", type=int, default=120, help="most video frames stylized per run")
    s = p.add_argument_group("server")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (all interfaces) instead of 127.0.0.1")
    s.add_argument("--share", action="store_true", help="also open a public *.gradio.live link")
    return p.parse_args(argv)


# UI ---------------------------------------------------------------------------------------------------------------
def banner(app: StyleApp) -> str:
    e = app.engine
    kinds = {}
    for entry in e.catalog.entries.values():
        kinds.setdefault(entry.kind, []).append(f"{entry.eta:g}" if entry.eta is not None else "?")
    loras = "; ".join(f"{k} η {'/'.join(sorted(v))}" for k, v in sorted(kinds.items())) or "none (base model only)"
    style = e.style or "off (no IP-Adapter loaded)"
    return (f"**Base** {e.base_label} ({e.arch.upper()}, {e.device}) · **STD LoRAs** {loras} · "
            f"**Style reference** {style}")


def settings_controls(app: StyleApp, kind: str) -> dict:
    """The controls every tab shares, in the order the handlers take them (Advanced accordion included)."""
    catalog, limits = app.engine.catalog, app.limits
    default = catalog.default(kind)
    eta = catalog.entries[default].eta if default and catalog.entries[default].eta else 0.75
    c = {}
    c["prompt"] = gr.Textbox(label="Prompt (the target style)", lines=2, placeholder="e.g. an oil painting, "
                                                                                        "thick impasto brush strokes")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1)
    c["lora"] = gr.Dropdown(catalog.choices(kind) + [NO_LORA], value=default or NO_LORA, label="STD LoRA",
                            info="The model zoo has one LoRA per η; i2i for images, v2v for video.")
    c["start_strength"] = gr.Slider(0.05, 1.0, value=eta, step=0.01, label="Start strength η",
                                    info="How far the content is noised: higher stylizes more, lower keeps more "
                                         "content. Snapped to the LoRA's trained η.")
    c["nfe"] = gr.Slider(1, 50, value=8, step=1, label="NFE (sampler steps)")
    c["gamma"] = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Gamma (per-step stochasticity)",
                           info="0 = deterministic, what the official STD inference runs. Not η.")
    c["cfg"] = gr.Slider(0.0, 15.0, value=6.0, step=0.1, label="CFG scale", info="1 disables the negative branch")
    with gr.Row():
        c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed")
        c["randomize_seed"] = gr.Checkbox(value=True, label="Randomize seed")
    c["output_size"] = gr.Slider(limits.min_size, limits.max_size, value=limits.default_size, step=8,
                                 label="Output size (long side, px)")
    c["plan_info"] = gr.Markdown(app.describe_plan(c["lora"].value, eta, True, 8, "official"), label="plan")
    with gr.Accordion("Advanced", open=False):
        c["snap_eta"] = gr.Checkbox(value=True, label="Snap η to the LoRA",
                                    info="Run the η the LoRA was trained for (warns when the slider differs)")
        c["plan"] = gr.Radio(list(PLANS), value="official", label="Plan",
                             info="official: the timesteps of the official STD inference; trained_start: start "
                                  "exactly where the LoRA was trained to start")
        c["style_preset"] = gr.Dropdown(list(PRESET_NAMES), value="style", label="Style blocks (IP-Adapter)")
        c["style_weight"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Style reference weight")
        c["lora_scale"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength")
    return c


SETTINGS_ORDER = ("prompt", "negative_prompt", "lora", "start_strength", "snap_eta", "nfe", "gamma", "cfg", "seed",
                  "randomize_seed", "output_size", "plan", "style_preset", "style_weight", "lora_scale")


def wire_plan_preview(app: StyleApp, c: dict, api_name: str | None) -> None:
    """Keep the "will run" line current and move η to a newly chosen LoRA's trained η."""
    inputs = [c["lora"], c["start_strength"], c["snap_eta"], c["nfe"], c["plan"]]
    c["lora"].change(app.lora_eta, c["lora"], c["start_strength"], queue=False, api_visibility="private")
    for i, comp in enumerate(inputs):
        public = api_name is not None and i == 0
        comp.change(app.describe_plan, inputs, c["plan_info"], queue=False, show_progress="hidden",
                    api_name=api_name if public else None, api_visibility="public" if public else "private")


def gpu_event(button: gr.Button, fn, inputs: list, outputs: list, api_name: str) -> None:
    button.click(fn, inputs, outputs, api_name=api_name, preprocess=False, concurrency_limit=1, concurrency_id=GPU)


def image_input(label: str, **kwargs) -> gr.Image:
    return gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], height=IMAGE_HEIGHT, **kwargs)


def image_tab(app: StyleApp) -> None:
    with gr.Row():
        with gr.Column():
            with gr.Row():
                content = image_input("Content image", elem_id="image-content")
                style = image_input("Style reference (optional)")
            c = settings_controls(app, "i2i")
            run = gr.Button("Stylize", variant="primary", elem_id="image-run")
        with gr.Column():
            result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                              buttons=["download", "fullscreen"], height=RESULT_HEIGHT, elem_id="image-result")
            download = gr.File(label="Download (PNG with the settings in its metadata)")
            info = gr.Markdown(label="run info", elem_id="image-info")
    wire_plan_preview(app, c, "plan")
    gpu_event(run, app.stylize_image, [content, style, *(c[k] for k in SETTINGS_ORDER)],
              [result, download, info, c["seed"]], "stylize_image")


def video_tab(app: StyleApp) -> None:
    with gr.Row():
        with gr.Column():
            with gr.Row():
                content = gr.Video(label="Content video", sources=["upload"], height=IMAGE_HEIGHT)
                style = image_input("Style reference (optional)")
            c = settings_controls(app, "v2v")
            with gr.Accordion("Video", open=False):
                fpb = gr.Slider(1, 64, value=16, step=1, label="Frames per batch", info="bounds peak memory")
                overlap = gr.Slider(0, 32, value=0, step=1, label="Overlap (frames cross-faded between batches)")
                noise = gr.Radio(list(NOISE_MODES), value="shared", label="Noise",
                                 info="shared: every frame gets the same noise (temporally consistent)")
                cap = gr.Slider(0, app.limits.max_frames, value=min(48, app.limits.max_frames), step=1,
                                label="Frame load cap (0 = up to the app's limit)")
                nth = gr.Slider(1, 10, value=1, step=1, label="Select every nth frame")
            run = gr.Button("Stylize video", variant="primary")
        with gr.Column():
            result = gr.Video(label="Result", interactive=False, height=RESULT_HEIGHT)
            download = gr.File(label="Download (mp4 and the settings as JSON)", file_count="multiple")
            info = gr.Markdown(label="run info")
    wire_plan_preview(app, c, None)
    gpu_event(run, app.stylize_video, [content, style, *(c[k] for k in SETTINGS_ORDER), fpb, overlap, noise, cap, nth],
              [result, download, info, c["seed"]], "stylize_video")


def compare_tab(app: StyleApp) -> None:
    with gr.Row():
        with gr.Column():
            with gr.Row():
                content = image_input("Content image")
                style = image_input("Style reference (optional)")
            teacher_steps = gr.Slider(1, 50, value=20, step=1, label="Teacher steps (base model, DDIM)")
            c = settings_controls(app, "i2i")
            run = gr.Button("Compare", variant="primary")
        with gr.Column():
            with gr.Row():
                teacher = gr.Image(label="Teacher (many steps)", type="filepath", format="png", interactive=False,
                                   height=RESULT_HEIGHT)
                student = gr.Image(label="STD (few steps)", type="filepath", format="png", interactive=False,
                                   height=RESULT_HEIGHT)
            info = gr.Markdown(label="run info")
    wire_plan_preview(app, c, None)
    order = list(SETTINGS_ORDER)
    inputs = [content, style, *(c[k] for k in order[:6]), teacher_steps, *(c[k] for k in order[6:])]
    gpu_event(run, app.compare, inputs, [teacher, student, info, c["seed"]], "compare")


def onestep_tab(app: StyleApp) -> None:
    loras = app.engine.catalog.choices("onestep")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a lighthouse on a cliff at dusk, oil painting")
            lora = gr.Dropdown(loras, value=loras[0] if loras else None, label="SiD-LSG one-step LoRA",
                               info="Trained with python -m training.sid_lsg (one network evaluation per image).")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                randomize = gr.Checkbox(value=True, label="Randomize seed")
            with gr.Row():
                width = gr.Slider(app.limits.min_size, app.limits.max_size, value=min(512, app.limits.max_size),
                                  step=8, label="Width")
                height = gr.Slider(app.limits.min_size, app.limits.max_size, value=min(512, app.limits.max_size),
                                   step=8, label="Height")
            batch = gr.Slider(1, 8, value=1, step=1, label="Images")
            run = gr.Button("Generate", variant="primary")
        with gr.Column():
            gallery = gr.Gallery(label="One-step images", height=RESULT_HEIGHT)
            download = gr.File(label="Download (PNGs with the settings in their metadata)", file_count="multiple")
            info = gr.Markdown(label="run info")
    gpu_event(run, app.one_step, [prompt, lora, seed, randomize, width, height, batch],
              [gallery, download, info, seed], "one_step")


def build_demo(app: StyleApp) -> gr.Blocks:
    """The whole UI around a :class:`StyleApp`; the queue has one worker for everything that runs the model."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nFew-step style transfer with Single Trajectory Distillation (arXiv 2412.18945).")
        gr.Markdown(banner(app))
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
    """Start the server; results are served from the app's output folder only."""
    app.output_dir.mkdir(parents=True, exist_ok=True)
    return demo.launch(allowed_paths=[str(app.output_dir.resolve())], max_file_size="500mb", **kwargs)


def server_options(args: argparse.Namespace) -> dict:
    """127.0.0.1 unless --listen; a public link only with --share."""
    return {"server_name": "0.0.0.0" if args.listen else "127.0.0.1", "server_port": args.port, "share": args.share}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = load_engine(model_options(args))
    except STDInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    app = StyleApp(engine, args.output_dir, Limits.for_engine(engine, args.max_frames))
    launch(build_demo(app), app, **server_options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
