"""Video nodes: STDLoadVideo (streamed batch loader with audio), STDStylizeVideo (chunked, shared-noise STD),
STDSaveVideo (with audio) and STDStylizeVideoFile (the streamed file-to-file path for clips of any length)."""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import InputImpl, io, ui

from ..core.filenames import check_prefix
from ..core.chunks import Chunking
from ..core.plan import check_gamma
from ..core.audio import read_audio
from ..core.stream import output_format, stylize_video_file
from ..core.frames import RESIZE_MODES
from ..core.video import FPS_RANGE, SAVE_FORMATS, VIDEO_EXTENSIONS, open_video, save_video
from .comfy_compat import OWN_CHECK, trim_window
from .comfy_glue import sample_std_chunks, sample_std_latents
from .common import (CATEGORY_VIDEO, chunking_inputs, conditioning_inputs, input_file, plan_input, prepare_run, run_inputs,
                     stylize_inputs, user_errors, user_path)

log = logging.getLogger("comfyui_std")
#: what STD Stylize Video File writes: the source's container, or mp4 / webm
FILE_FORMATS = ("source", "mp4", "webm")


def _input_videos() -> list[str]:
    d = folder_paths.get_input_directory()
    try:
        return sorted(f for f in os.listdir(d) if f.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(d, f)))
    except OSError:
        return []


def _resolve(video: str, path: str) -> Path:
    if isinstance(path, str) and path.strip():
        return user_path(path, "path")
    return input_file(video, "video")


def _selection_inputs() -> list:
    """Frame selection shared by STD Load Video and STD Stylize Video File (the core reader's semantics)."""
    return [
        io.Int.Input("frame_load_cap", default=0, min=0, max=100000, tooltip="Keep at most this many frames (0 = all)."),
        io.Int.Input("skip_first_frames", default=0, min=0, max=10000000,
                     tooltip="Drop this many frames first (counted after force_rate)."),
        io.Int.Input("select_every_nth", default=1, min=1, max=1000, tooltip="Then keep every nth frame."),
        io.Float.Input("force_rate", default=0.0, min=0.0, max=240.0, step=1.0,
                       tooltip="Resample to this frame rate by timestamps (0 = source rate)."),
        io.Combo.Input("resize", options=list(RESIZE_MODES), default="crop",
                       tooltip="Make width and height multiples of 8: center crop, edge pad or stretch."),
    ]


def _source_inputs() -> list:
    return [
        io.Combo.Input("video", options=_input_videos(), upload=io.UploadType.video,
                       tooltip="A video in ComfyUI's input folder (the button uploads one)."),
    ]


def _optional_source_inputs() -> list:
    return [
        io.String.Input("path", default="", optional=True,
                        tooltip="Optional video file or folder of frames instead of video: relative to the input "
                                "folder, or absolute inside the input/output folders (the server owner can allow "
                                "more with the STD_ALLOWED_PATHS environment variable)."),
        io.Video.Input("source", optional=True,
                       tooltip="Optional core VIDEO (Load Video, Create Video, ...) read instead of video/path."),
    ]


@contextmanager
def _opened(video, path, source, *selection, probe: bool = True):
    """The core reader over the chosen source: a core VIDEO (spilled to the temp folder when it lives in memory),
    a typed path, or a file of the input folder."""
    spilled, window = None, None
    try:
        if source is not None:
            window = trim_window(source)
            where = None if isinstance(source, InputImpl.VideoFromComponents) else source.get_stream_source()
            if isinstance(where, (str, os.PathLike)):
                file = Path(where)
            else:  # an in-memory VIDEO: the reader needs a file (it probes, then decodes)
                spilled = Path(folder_paths.get_temp_directory()) / f"std_source_{uuid.uuid4().hex[:12]}.mp4"
                spilled.parent.mkdir(parents=True, exist_ok=True)
                if where is None:  # frames (and audio) from Create Video: ComfyUI writes them as h264 mp4
                    source.save_to(str(spilled))
                else:
                    spilled.write_bytes(where.read())
                file = spilled
        else:
            file = _resolve(video, path)
        with open_video(file, *selection, probe=probe, window=window) as reader:
            yield reader
    finally:
        if spilled is not None:
            spilled.unlink(missing_ok=True)


def _comfy_audio(track) -> dict | None:
    """ComfyUI's AUDIO (``{"waveform": [1, channels, samples], "sample_rate": int}``), or None without audio."""
    return None if track is None else {"waveform": track.waveform[None], "sample_rate": int(track.sample_rate)}


class STDLoadVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDLoadVideo",
            display_name="STD Load Video",
            category=CATEGORY_VIDEO,
            description="Loads a video (mp4, webm, mov, mkv, gif, avi), a folder of frames or a core VIDEO as an "
                        "IMAGE batch plus its audio, decoding as a stream: with a frame cap it stops early and only "
                        "kept frames are held in memory.",
            inputs=[*_source_inputs(), *_selection_inputs(), *_optional_source_inputs()],
            outputs=[io.Image.Output(display_name="images"),
                     io.Int.Output(display_name="frame_count"),
                     io.Float.Output(display_name="fps"),
                     io.Int.Output(display_name="source_width"),
                     io.Int.Output(display_name="source_height"),
                     io.Audio.Output(display_name="audio",
                                     tooltip="The audio of the kept span (None when the source has none).")],
        )

    @classmethod
    def validate_inputs(cls, video):
        """ComfyUI leaves ``video`` to this node, which checks it when it runs (``path`` or ``source`` may replace
        it, so an empty input folder is no error; see comfy_compat)."""
        return OWN_CHECK

    @classmethod
    def fingerprint_inputs(cls, video, frame_load_cap=0, skip_first_frames=0, select_every_nth=1, force_rate=0.0,
                           resize="crop", path="", source=None):
        if source is not None:
            return f"source:{id(source)}"
        try:
            p = _resolve(video, path)
            return f"{p}:{p.stat().st_mtime_ns}"
        except (OSError, ValueError):
            return ""

    @classmethod
    @user_errors
    def execute(cls, video, frame_load_cap=0, skip_first_frames=0, select_every_nth=1, force_rate=0.0,
                resize="crop", path="", source=None) -> io.NodeOutput:
        with _opened(video, path, source, frame_load_cap, skip_first_frames, select_every_nth, force_rate, resize,
                     8.0, probe=False) as reader:
            frames = reader.read_all()
            info, stream, notices = reader.video_info(), reader.info, reader.notices
            track = (read_audio(stream.path, stream.start_time, info.frame_count / info.fps)
                     if stream.has_audio else None)
        audio = "no audio" if track is None else f"audio {track.sample_rate} Hz x{track.waveform.shape[0]}"
        text = (f"{info.frame_count} frames at {info.fps:g} fps, {info.width}x{info.height} "
                f"(source {info.source_width}x{info.source_height} at {info.source_fps:g} fps; "
                f"{info.decoded_frames} decoded), {audio}")
        return io.NodeOutput(frames, info.frame_count, float(info.fps), info.source_width, info.source_height,
                             _comfy_audio(track), ui={"text": [text, *notices]})


class STDStylizeVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDStylizeVideo",
            display_name="STD Stylize Video",
            category=CATEGORY_VIDEO,
            description="STD style transfer of a batch of frames as one video: one noise shared by all frames "
                        "(temporally consistent), processed in chunks of frames_per_batch with cross-faded overlaps; every frame "
                        "keeps its own inpainting mask and ControlNet hint. "
                        "Works with AnimateDiff-Evolved motion models (set its beta_schedule to 'use existing').",
            inputs=[
                *stylize_inputs("Model with the STD LoRA (and optionally a motion module).",
                                "The VAE-encoded frames, one batch entry per frame."),
                *chunking_inputs(),
                plan_input(),
            ],
            outputs=[io.Latent.Output(tooltip="Stylized frames; decode with the same VAE.")],
        )

    @classmethod
    @user_errors
    def execute(cls, model, positive, negative, latent_image, seed, nfe=8, start_strength=0.75, gamma=0.0, cfg=6.0,
                frames_per_batch=16, overlap=0, noise="shared", plan="official") -> io.NodeOutput:
        gamma, chunking = check_gamma(gamma), Chunking(frames_per_batch, overlap, noise)
        p, sigmas, samples = prepare_run(model, nfe, start_strength, plan, latent_image)
        chunks = len(chunking.ranges(samples.shape[0]))
        out = sample_std_chunks(model, positive, negative, latent_image, samples, sigmas, seed, gamma, cfg, chunking)
        text = p.describe() + f"; {samples.shape[0]} frames in {chunks} chunk(s)"
        log.info(text)
        return io.NodeOutput(out, ui={"text": [text]})


def _output_file(filename_prefix: str, ext: str, width: int, height: int) -> tuple[Path, str, str]:
    """(path, file name, subfolder) of a new file in ComfyUI's output folder; prefixes that leave it are refused."""
    prefix = check_prefix(filename_prefix)
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    file = f"{filename}_{counter:05}_.{ext}"
    return Path(folder) / file, file, subfolder


def _saved_ui(file: str, subfolder: str, fmt: str) -> dict:
    """The UI payload that shows a saved video (or animated image) on the node."""
    result = ui.SavedResult(file, subfolder, io.FolderType.output)
    if fmt in ("gif", "webp"):
        return {"images": [dict(result)], "animated": (True,)}
    return ui.PreviewVideo([result]).as_dict()


class STDSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDSaveVideo",
            display_name="STD Save Video",
            category=CATEGORY_VIDEO,
            description="Saves an IMAGE batch (and optionally an AUDIO track) as mp4 (h264), webm (vp9), animated "
                        "webp or gif in the output folder; the file is also a core VIDEO output.",
            inputs=[
                io.Image.Input("images", tooltip="Frames to save, in order."),
                io.Float.Input("fps", default=8.0, min=FPS_RANGE[0], max=FPS_RANGE[1], step=0.01,
                               tooltip="Frame rate of the file (connect STD Load Video's fps); gif plays at most "
                                       "50 fps."),
                io.String.Input("filename_prefix", default="STD/video", tooltip="Prefix inside the output folder."),
                io.Combo.Input("format", options=list(SAVE_FORMATS), default="mp4", tooltip="Container and codec."),
                io.Audio.Input("audio", optional=True,
                               tooltip="Optional audio to mux (e.g. STD Load Video's audio): cut where the video "
                                       "ends; mp4 and webm only."),
            ],
            outputs=[io.Video.Output(display_name="video", tooltip="The saved file as a core VIDEO.")],
            is_output_node=True,
        )

    @classmethod
    @user_errors
    def execute(cls, images, fps=8.0, filename_prefix="STD/video", format="mp4", audio=None) -> io.NodeOutput:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
            raise ValueError("images: expected an IMAGE batch [frames, height, width, 3]")
        if format not in SAVE_FORMATS:
            raise ValueError(f"format: got {format!r}, choose one of {', '.join(SAVE_FORMATS)}")
        path, file, subfolder = _output_file(filename_prefix, format, images.shape[2], images.shape[1])
        save_video(images, path, fps, format, audio=audio)
        return io.NodeOutput(InputImpl.VideoFromFile(str(path)), ui=_saved_ui(file, subfolder, format))


class STDStylizeVideoFile(io.ComfyNode):
    """The streamed video path inside ComfyUI: a video file in, a stylized video file out, in constant memory."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDStylizeVideoFile",
            display_name="STD Stylize Video File",
            category=CATEGORY_VIDEO,
            description="Stylizes a whole video file chunk by chunk – decode, VAE-encode, STD, VAE-decode, encode – "
                        "so memory does not grow with the clip's length (for clips too long for an IMAGE batch). "
                        "The same noise, chunks and cross-fades as STD Stylize Video; the audio is kept.",
            inputs=[
                *conditioning_inputs("Model with the STD LoRA (the v2v LoRA for video; optionally a motion module)."),
                io.Vae.Input("vae", tooltip="The model's VAE (encodes and decodes each chunk)."),
                *_source_inputs(),
                *run_inputs(),
                *chunking_inputs(),
                *_selection_inputs(),
                io.Boolean.Input("tiled_vae", default=False,
                                 tooltip="Encode and decode in tiles (large frames on a small GPU)."),
                io.Boolean.Input("keep_audio", default=True, tooltip="Copy the source's audio into the output."),
                io.String.Input("filename_prefix", default="STD/stylized", tooltip="Prefix inside the output folder."),
                io.Combo.Input("format", options=list(FILE_FORMATS), default="source",
                               tooltip="source: the source's container (a frames folder gives mp4); or mp4 / webm."),
                plan_input(),
                *_optional_source_inputs(),
            ],
            outputs=[io.Video.Output(display_name="video", tooltip="The stylized file as a core VIDEO.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, video):
        """ComfyUI leaves ``video`` to this node, which checks it when it runs (``path`` or ``source`` may replace
        it, so an empty input folder is no error; see comfy_compat)."""
        return OWN_CHECK

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return STDLoadVideo.fingerprint_inputs(kwargs.get("video"), path=kwargs.get("path", ""),
                                               source=kwargs.get("source"))

    @classmethod
    @user_errors
    def execute(cls, model, positive, negative, vae, video, seed, nfe=8, start_strength=0.75, gamma=0.0, cfg=6.0,
                frames_per_batch=16, overlap=0, noise="shared", frame_load_cap=0, skip_first_frames=0,
                select_every_nth=1, force_rate=0.0, resize="crop", tiled_vae=False, keep_audio=True,
                filename_prefix="STD/stylized", format="source", plan="official", path="",
                source=None) -> io.NodeOutput:
        gamma, chunking = check_gamma(gamma), Chunking(frames_per_batch, overlap, noise)  # before any decoding
        if format not in FILE_FORMATS:
            raise ValueError(f"format: got {format!r}, choose one of {', '.join(FILE_FORMATS)}")
        p, sigmas, _ = prepare_run(model, nfe, start_strength, plan)
        encode = (lambda f: vae.encode_tiled(f[..., :3])) if tiled_vae else (lambda f: vae.encode(f[..., :3]))
        decode = (lambda z: vae.decode_tiled(z)) if tiled_vae else (lambda z: vae.decode(z))

        def run_chunk(s, e, latents, chunk_noise):
            return sample_std_latents(model, positive, negative, latents, chunk_noise, sigmas, seed, gamma, cfg,
                                      chunking.noise, s, e)

        with _opened(video, path, source, frame_load_cap, skip_first_frames, select_every_nth, force_rate,
                     resize, 8.0) as reader:
            info = reader.info
            fmt = output_format(info.container) if format == "source" else format
            out, file, subfolder = _output_file(filename_prefix, fmt, info.width, info.height)
            report = stylize_video_file(
                reader, out, encode=lambda f: encode(f).float(), run_chunk=run_chunk,
                decode=lambda z: decode(z)[..., :3].float().cpu(), seed=seed, chunking=chunking,
                audio=bool(keep_audio), fmt=fmt)
        text = (p.describe() + f"; {report.frames} frames at {report.fps:g} fps in {report.chunks} chunk(s), "
                f"{report.width}x{report.height}, audio: {report.audio}")
        log.info(text)
        return io.NodeOutput(InputImpl.VideoFromFile(str(out)), ui={**_saved_ui(file, subfolder, fmt),
                                                                    "text": [text, *report.notices]})


NODES = [STDLoadVideo, STDStylizeVideo, STDSaveVideo, STDStylizeVideoFile]
