"""Gradio event handlers: check what the browser (or an API client) sent, run the engine, return files and notices.

Every handler turns :class:`~comfyui_std.core.STDInputError` (and out-of-memory) into ``gr.Error`` with the core's
message, shows notices with ``gr.Warning`` and repeats them in the run's info text; the last error of each browser
session is kept for the run info too (:meth:`StyleApp.last_error`), because toasts vanish. Handlers receive raw
Gradio payloads (the events are registered with ``preprocess=False``) so that an unreadable upload becomes a
readable message instead of a failed preprocessing step; every file path in a payload goes through
:meth:`StyleApp.upload`, which accepts only files the serving app received as uploads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from comfyui_std.core import STDInputError, check_range
from comfyui_std.core.errors import check_bool
from comfyui_std.core.chunks import Chunking
from comfyui_std.core.errors import redact_paths
from comfyui_std.core.plan import teacher_plan
from comfyui_std.core.video import open_video

from .engine import RunResult, STDEngine, app_plan, resolve_start_strength
from .media import (MIN_SIDE, MIN_SOURCE_SIDE, checked_upload, fit_size, frame_to_image, image_to_frames,
                    payload_path, read_image, received_files, run_record, save_png, scrub, size_notices)
from .settings import StyleSettings

log = logging.getLogger("std_app")

SEED_RANGE = 2 ** 32
OOM_MESSAGE = ("Out of GPU memory: lower the output size (for video also frames per batch) and try again; the app "
               "keeps running.")


def _event_context():
    """(the running ``gr.Blocks``, the browser session id) of the event being handled; (None, None) outside one."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return LocalContext.blocks.get(None), getattr(request, "session_hash", None)


#: what a file input's data model holds, in words, for the messages of :func:`api_input_problem`
FILE_KINDS = {"ImageData": "an image file", "VideoData": "a video file", "FileData": "a file",
              "ListFiles": "a list of files"}


def api_input_problem(block_fn, inputs: list) -> str | None:
    """What is wrong with the raw inputs of an API call before Gradio reads them, in words, or None.

    Gradio checks the count and the file payloads itself, before any handler runs, and answers a mistake with "the
    upstream Gradio app has raised an exception" (or ``{"error": null}`` over raw HTTP): a call with too few
    inputs, or a string or number where an image belongs. Those two are named here instead; everything else goes
    on to Gradio unchanged (its path checks answer alike whether a file exists or not)."""
    blocks = list(block_fn.inputs)
    labels = [getattr(b, "label", None) or type(b).__name__ for b in blocks]
    endpoint = f"/{block_fn.api_name}" if isinstance(block_fn.api_name, str) else "this event"
    if len(inputs) < len(blocks):
        return (f"{endpoint} takes {len(blocks)} inputs, in this order: {', '.join(labels)}; the call sent "
                f"{len(inputs)}. Send them all (None for an empty one), or call it with gradio_client, which fills in "
                "the inputs left out (docs/api.md)")
    for index, (block, value) in enumerate(zip(blocks, inputs)):
        model = getattr(block, "data_model", None)
        if model is None or value is None:
            continue
        try:
            model.model_validate(value)
        except Exception:  # noqa: BLE001 -- pydantic's ValidationError: the payload is not this kind of file
            kind = FILE_KINDS.get(getattr(model, "__name__", ""), "a file")
            return (f"{endpoint}: input {index + 1} ({labels[index]}) must be {kind} (with gradio_client: "
                    f"handle_file(path)), not a {type(value).__name__}")
    return None


class CheckedBlocks(gr.Blocks):
    """``gr.Blocks`` whose API calls are checked by :func:`api_input_problem` first, so that a client's mistake gets
    a message (``gr.Error``) instead of Gradio's anonymous exception."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        problem = api_input_problem(block_fn, list(inputs or []))
        if problem:
            raise gr.Error(problem, print_exception=False)
        return await super().preprocess_data(block_fn, inputs, state, explicit_call)


def user_errors(fn):
    """Show input errors as they are (``gr.Error``); anything unexpected is logged with its traceback and shown as
    one line, so the server keeps serving. The message is also kept as the session's last error."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except gr.Error as err:
            self.remember_error(str(err.message))
            raise
        except STDInputError as err:
            message = redact_paths(str(err))  # an app client must not learn the server's folders
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            message = OOM_MESSAGE
        except Exception as err:  # the last line of defence for the UI: log it and keep serving
            log.exception("%s failed", fn.__name__)
            message = f"Something went wrong ({type(err).__name__}); details are in the server log."
        self.remember_error(message)
        raise gr.Error(message, print_exception=False)

    return wrapper


@dataclass(frozen=True)
class Limits:
    """Sizes the app accepts, derived from the model's native resolution unless given."""

    default_size: int
    min_size: int
    max_size: int
    max_side: int     # uploads with a longer side are downscaled, with a notice
    max_frames: int   # frames of a video stylized at most

    @classmethod
    def for_engine(cls, engine: STDEngine, max_frames: int = 1800) -> "Limits":
        native = engine.native_size
        return cls(default_size=native, min_size=max(MIN_SIDE, native // 4), max_size=native * 2, max_side=native * 4,
                   max_frames=max_frames)


def payload_is_empty(payload) -> bool:
    return payload_path(payload) is None


def _notify(notices: list[str]) -> None:
    for notice in notices:
        gr.Warning(notice)


class StyleApp:
    """The handlers of the Image, Video, Compare and One-step tabs around one :class:`STDEngine`.

    ``local_files=True`` lets in-process callers (scripts, tests calling the handlers directly) pass local paths;
    through the server only uploads are ever read, whatever this flag says.
    """

    MAX_SESSIONS = 1024  # last errors kept (one per browser session, oldest dropped first)

    def __init__(self, engine: STDEngine, output_dir: Path, limits: Limits | None = None, *,
                 local_files: bool = False):
        self.engine = engine
        self.output_dir = Path(output_dir)
        self.limits = limits or Limits.for_engine(engine)
        self.local_files = local_files
        self._errors: OrderedDict[str, str] = OrderedDict()
        self._errors_lock = threading.Lock()

    # Uploads and errors -------------------------------------------------------------------------------------------
    def upload(self, payload, what: str) -> Path:
        """The local file behind an upload payload; refuses anything the serving app did not receive itself."""
        blocks, _ = _event_context()
        if blocks is not None:
            allowed = received_files(blocks)
        else:  # called in-process, not by the server: local paths only when the caller asked for them
            allowed = None if self.local_files else set()
        return checked_upload(payload, what, allowed)

    def remember_error(self, message: str) -> None:
        _, session = _event_context()
        if session is None:
            return
        with self._errors_lock:
            self._errors[session] = message
            self._errors.move_to_end(session)
            while len(self._errors) > self.MAX_SESSIONS:
                self._errors.popitem(last=False)

    def last_error(self, request: gr.Request = None) -> str:
        """The run info after a failed run: the error stays readable after its toast is gone."""
        session = getattr(request, "session_hash", None)
        with self._errors_lock:
            message = self._errors.get(session) if session else None
        return f"⚠️ **The last run failed**: {message}" if message else "⚠️ **The last run failed** (see the message)."

    def check_image(self, payload, what: str) -> tuple[str, dict]:
        """Run right after an image upload: say at once whether it can be used (and what will happen to it).
        Returns (run info, update of the upload component: cleared when the file cannot be used)."""
        try:
            path = self.upload(payload, what)
            _, notices, size = read_image(path, what, self.limits.max_side)
        except STDInputError as err:
            return self._refuse_upload(err)
        _notify(notices)
        lines = [f"{what.capitalize()}: {path.name}, {size[0]}x{size[1]}."] + [f"⚠️ {n}" for n in notices]
        return "  \n".join(lines), gr.update()

    def check_content(self, payload) -> tuple[str, dict]:
        return self.check_image(payload, "content image")

    def check_style(self, payload) -> tuple[str, dict]:
        return self.check_image(payload, "style image")

    def check_video(self, payload) -> tuple[str, dict]:
        """Run right after a video upload: decode its first frame so that a broken file is flagged at once."""
        try:
            path, info = self.open_video(payload)
        except STDInputError as err:
            return self._refuse_upload(err)
        return f"Video: {path.name}, {info.width}x{info.height} at {info.source_fps:g} fps.", gr.update()

    def _refuse_upload(self, err: STDInputError) -> tuple[str, dict]:
        message = redact_paths(str(err))
        gr.Warning(message)
        self.remember_error(message)
        return f"⚠️ {message}", gr.update(value=None)

    # Settings -----------------------------------------------------------------------------------------------------
    def settings(self, *, lora, start_strength, snap_eta, seed, randomize_seed,
                 **style) -> tuple[StyleSettings, list[str]]:
        """Validated settings and notices (η snapped to the LoRA, seed drawn when randomized); every value by name,
        ``style`` holding the other :class:`StyleSettings` fields."""
        entry = self.engine.catalog.get(lora)
        if entry is not None and entry.kind == "onestep":
            raise STDInputError("lora", f"'{entry.name}' is a SiD-LSG one-step text-to-image generator, not an STD "
                                        "style-transfer LoRA: use it in the One-step tab, or pick an STD LoRA")
        eta, notice = resolve_start_strength(entry, start_strength, check_bool("snap_eta", snap_eta))
        if check_bool("randomize_seed", randomize_seed):
            seed = random.randrange(SEED_RANGE)
        settings = StyleSettings(**style, lora=entry and entry.name, start_strength=eta, seed=seed).validated()
        app_plan(settings.nfe, settings.start_strength, settings.plan)  # refuse bad NFE/η before any work
        return settings, [notice] if notice else []

    def output_size(self, size) -> int:
        return check_range("output_size", size, self.limits.min_size, self.limits.max_size, kind=int)

    def style_image(self, payload) -> tuple:
        """The style reference as a PIL image (None when none was given) and notices about it."""
        if payload_is_empty(payload):
            return None, []
        image, notices, _ = read_image(self.upload(payload, "style image"), "style image", self.limits.max_side)
        return image, notices

    def open_video(self, payload) -> tuple[Path, object]:
        """(path, StreamInfo) of an uploaded video, checked by decoding its first frame; messages name the upload,
        never the server folder."""
        path = self.upload(payload, "video")
        with self.video_errors(path):
            with open_video(path, 1, probe=False) as reader:
                info = reader.info
        if min(info.width, info.height) < MIN_SOURCE_SIDE:
            raise STDInputError("video", f"'{path.name}' is {info.width}x{info.height}, too small to stylize: both "
                                         f"sides need at least {MIN_SOURCE_SIDE} pixels")
        return path, info

    @staticmethod
    @contextmanager
    def video_errors(path: Path):
        """Core video errors with the server's folder taken out of them."""
        try:
            yield
        except STDInputError as err:
            if err.input_name != "video":
                raise
            raise STDInputError("video", scrub(str(err).removeprefix("video: "), path)) from None

    def content_frames(self, payload, size) -> tuple[torch.Tensor, list[str]]:
        """The content image as one frame at the output size, with notices (downscale, upscale, squash)."""
        long_side = self.output_size(size)
        path = self.upload(payload, "content image")
        image, notices, source = read_image(path, "content image", self.limits.max_side)
        target = fit_size(image.width, image.height, long_side, self.engine.vae_scale)
        return image_to_frames(image, target), notices + size_notices("content image", source, target, long_side)

    # Plan preview -------------------------------------------------------------------------------------------------
    def describe_plan(self, lora, start_strength, snap_eta, nfe, plan) -> str:
        """What a run with these settings will do: NFE, start timestep, timesteps (or why it cannot run)."""
        try:
            entry = self.engine.catalog.get(lora)
            eta, notice = resolve_start_strength(entry, start_strength, bool(snap_eta))
            p = app_plan(nfe, eta, plan)
        except STDInputError as err:
            return f"⚠️ {err}"
        text = (f"Will run **NFE {p.nfe}** from **start timestep {p.start_timestep}** (η {p.start_strength:g}, "
                f"{p.plan} plan; timesteps {', '.join(map(str, p.timesteps))})")
        return text + (f"  \n⚠️ {notice}" if notice else "")

    def lora_eta(self, lora):
        """Move the η slider to the η a newly chosen LoRA was trained for."""
        try:
            entry = self.engine.catalog.get(lora)
        except STDInputError:
            return gr.update()
        return gr.update(value=entry.eta) if entry is not None and entry.eta is not None else gr.update()

    # Results ------------------------------------------------------------------------------------------------------
    def _stem(self, kind: str, seed: int) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.output_dir / f"std-{kind}-{stamp}-{seed}-{uuid.uuid4().hex[:6]}"

    def record(self, result: RunResult, style_used: bool) -> dict:
        """Everything needed to reproduce a result (written into PNG metadata and video sidecars)."""
        frames = result.frames
        return run_record(result.settings, result.plan, (frames.shape[2], frames.shape[1]),
                          base_model=self.engine.base_label, lora=result.lora, style_used=style_used,
                          frames=int(frames.shape[0]), seconds=result.seconds)

    def save_image(self, result: RunResult, kind: str, style_used: bool) -> Path:
        path = self._stem(kind, result.settings.seed).with_suffix(".png")
        return save_png(frame_to_image(result.frames[0]), path, self.record(result, style_used))

    def info(self, result: RunResult, notices: list[str]) -> str:
        lora = result.lora.describe() if result.lora else "none"
        size = f"{result.frames.shape[2]}x{result.frames.shape[1]}"
        lines = [f"**STD**: {result.plan.describe()}",
                 f"seed {result.settings.seed}, {size}, LoRA {lora}, {result.seconds:.2f} s"]
        lines += [f"⚠️ {n}" for n in notices]
        return "  \n".join(lines)

    # Tabs ---------------------------------------------------------------------------------------------------------
    @user_errors
    def stylize_image(self, content, style=None, prompt=None, negative_prompt=None, lora=None, start_strength=None,
                      snap_eta=None, nfe=None, gamma=None, cfg=None, seed=None, randomize_seed=None, output_size=None,
                      plan=None, style_preset=None, style_weight=None, lora_scale=None,
                      progress=gr.Progress(track_tqdm=True)):
        """Image tab: one content image, stylized with STD. Returns (image, download, info, seed)."""
        settings, notices = self.settings(
            prompt=prompt, negative_prompt=negative_prompt, lora=lora, start_strength=start_strength,
            snap_eta=snap_eta, nfe=nfe, gamma=gamma, cfg=cfg, seed=seed, randomize_seed=randomize_seed, plan=plan,
            style_preset=style_preset, style_weight=style_weight, lora_scale=lora_scale)
        frames, more = self.content_frames(content, output_size)
        style_image, style_notices = self.style_image(style)
        notices += more + style_notices
        _notify(notices)
        progress(0, desc="Stylizing")
        result = self.engine.run(frames, settings, style_image)
        path = self.save_image(result, "image", style_image is not None)
        return str(path), str(path), self.info(result, notices), settings.seed

    def motion_choice(self, value) -> str | None:
        """The Video tab's motion-module choice: one of the engine's modules or frame by frame (None: the loaded
        module, or frame by frame without one)."""
        from .engine import NO_MOTION

        if value in (None, ""):
            return None
        offered = self.engine.motion_modules()
        if not isinstance(value, str) or (value != NO_MOTION and value not in offered):
            raise STDInputError("motion module", f"choose one of: {', '.join(offered + [NO_MOTION])}" if offered
                                else "no motion module is loaded (start the app with --motion-module)")
        return value

    @user_errors
    def stylize_video(self, video, style=None, prompt=None, negative_prompt=None, lora=None, start_strength=None,
                      snap_eta=None, nfe=None, gamma=None, cfg=None, seed=None, randomize_seed=None, output_size=None,
                      plan=None, style_preset=None, style_weight=None, lora_scale=None, frames_per_batch=None,
                      overlap=None, noise=None, frame_load_cap=None, select_every_nth=None, motion_module=None,
                      progress=gr.Progress(track_tqdm=True)):
        """Video tab: frames stylized in chunks with shared noise, written as mp4 at the source frame rate.
        Returns (video, downloads, info, seed)."""
        settings, notices = self.settings(
            prompt=prompt, negative_prompt=negative_prompt, lora=lora, start_strength=start_strength,
            snap_eta=snap_eta, nfe=nfe, gamma=gamma, cfg=cfg, seed=seed, randomize_seed=randomize_seed, plan=plan,
            style_preset=style_preset, style_weight=style_weight, lora_scale=lora_scale)
        size = self.output_size(output_size)
        chunking = Chunking(frames_per_batch, overlap, noise)
        cap = check_range("frame_load_cap", frame_load_cap, 0, self.limits.max_frames, kind=int)
        style_image, style_notices = self.style_image(style)
        notices += style_notices
        path, info = self.open_video(video)
        target = fit_size(info.width, info.height, size, self.engine.vae_scale)
        notices += size_notices("video", (info.width, info.height), target, size)
        _notify(notices)
        progress(0, desc="Stylizing")

        def chunk_done(done, total):
            progress((done, total) if total else (done, done + 1), desc="Stylizing", unit="frames")

        stem = self._stem("video", settings.seed)
        with self.video_errors(path):
            result = self.engine.run_video_file(
                path, stem.with_suffix(".mp4"), settings, style_image, size=size, chunking=chunking, frame_load_cap=cap, select_every_nth=select_every_nth,
                max_frames=self.limits.max_frames, fmt="mp4", progress=chunk_done,
                motion_module=self.motion_choice(motion_module))
        notices += [n for n in result.notices if n not in notices]
        for notice in result.notices:
            gr.Warning(notice)
        record = dict(result.record, frames=result.frames, seconds=round(result.seconds, 3), audio=result.audio)
        sidecar = stem.with_suffix(".json")
        sidecar.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        lora = result.lora.describe() if result.lora else "none"
        lines = [f"**STD**: {result.plan.describe()}",
                 f"seed {result.settings.seed}, {result.width}x{result.height}, LoRA {lora}, {result.seconds:.2f} s",
                 f"{result.frames} frames at {result.fps:g} fps in {result.chunks} chunk(s), audio: {result.audio}"]
        text = "  \n".join(lines + [f"⚠️ {n}" for n in notices])
        return str(result.path), [str(result.path), str(sidecar)], text, settings.seed

    @user_errors
    def compare(self, content, style=None, prompt=None, negative_prompt=None, lora=None, start_strength=None,
                snap_eta=None, nfe=None, teacher_steps=None, gamma=None, cfg=None, seed=None, randomize_seed=None,
                output_size=None, plan=None, style_preset=None, style_weight=None, lora_scale=None,
                progress=gr.Progress(track_tqdm=True)):
        """Compare tab: the teacher (base model, many DDIM steps) and STD (LoRA, few steps) from the same start
        timestep and noise. Returns (teacher image, STD image, info, seed)."""
        settings, notices = self.settings(
            prompt=prompt, negative_prompt=negative_prompt, lora=lora, start_strength=start_strength,
            snap_eta=snap_eta, nfe=nfe, gamma=gamma, cfg=cfg, seed=seed, randomize_seed=randomize_seed, plan=plan,
            style_preset=style_preset, style_weight=style_weight, lora_scale=lora_scale)
        student = app_plan(settings.nfe, settings.start_strength, settings.plan)
        teacher_plan(student.start_timestep, teacher_steps, student.start_strength)  # checked before any work
        frames, more = self.content_frames(content, output_size)
        style_image, style_notices = self.style_image(style)
        notices += more + style_notices
        _notify(notices)
        progress(0, desc="Teacher")
        teacher = self.engine.run(frames, dataclasses.replace(settings, gamma=0.0), style_image,
                                  teacher_steps=teacher_steps)
        progress(0, desc="STD")
        student = self.engine.run(frames, settings, style_image)
        paths = [self.save_image(r, kind, style_image is not None)
                 for r, kind in ((teacher, "teacher"), (student, "image"))]
        speedup = teacher.seconds / max(student.seconds, 1e-9)
        text = (f"| | steps | start timestep | wall time |\n|---|---|---|---|\n"
                f"| teacher (base model, no LoRA, DDIM) | {teacher.plan.nfe} | {teacher.plan.start_timestep} | "
                f"{teacher.seconds:.2f} s |\n"
                f"| STD ({student.lora.name if student.lora else 'no LoRA'}) | {student.plan.nfe} | "
                f"{student.plan.start_timestep} | {student.seconds:.2f} s |\n\n"
                f"STD is {speedup:.1f}x faster. " + " ".join(f"⚠️ {n}" for n in notices))
        return str(paths[0]), str(paths[1]), text, settings.seed

    @user_errors
    def one_step(self, prompt, lora, seed, randomize_seed, width, height, batch_size,
                 progress=gr.Progress(track_tqdm=True)):
        """One-step tab: text-to-image with a SiD-LSG generator LoRA, one network evaluation per image.
        Returns (gallery, downloads, info, seed)."""
        entry = self.engine.catalog.get(lora)
        if entry is None or entry.kind != "onestep":
            raise STDInputError("lora", "choose a SiD-LSG one-step LoRA (its metadata says method sid_lsg)")
        if check_bool("randomize_seed", randomize_seed):
            seed = random.randrange(SEED_RANGE)
        if not str(prompt or "").strip():
            raise STDInputError("prompt", "a one-step generator makes an image from the prompt: write one")
        size = [check_range(n, v, self.limits.min_size, self.limits.max_size, kind=int)
                for n, v in (("width", width), ("height", height))]
        step = self.engine.vae_scale
        w, h = (max(step, v - v % step) for v in size)
        snapped = [f"{n} {v} is not a multiple of {step}: {u} used" for n, v, u in
                   (("width", size[0], w), ("height", size[1], h)) if u != v]
        _notify(snapped)
        settings = StyleSettings(prompt=prompt, seed=seed, lora=entry.name, cfg=1.0).validated()
        progress(0, desc="Generating")
        result = self.engine.generate(settings, h, w, batch_size, entry.t_init)
        paths = []
        for i in range(result.frames.shape[0]):
            path = self._stem("onestep", settings.seed).with_suffix(f".{i}.png")
            record = dict(self.record(result, False), index=i, t_init=entry.t_init, method="sid_lsg")
            paths.append(str(save_png(frame_to_image(result.frames[i]), path, record)))
        text = (f"**SiD-LSG**: one step from t_init {entry.t_init}, seed {settings.seed}, {w}x{h}, "
                f"LoRA {entry.describe()}, {result.seconds:.2f} s" + "".join(f"\n\n{n}" for n in snapped))
        return paths, paths, text, settings.seed
