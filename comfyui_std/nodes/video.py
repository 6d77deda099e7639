"""Video nodes: STDLoadVideo (streamed batch loader), STDStylizeVideo (chunked, shared-noise STD) and STDSaveVideo."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core.pipeline import NOISE_MODES, check_noise_mode
from ..core.plan import check_gamma
from ..core.video import (FPS_RANGE, RESIZE_MODES, SAVE_FORMATS, VIDEO_EXTENSIONS, chunk_ranges, load_video,
                          save_video)
from .comfy_glue import sample_std_chunks
from .common import CATEGORY_VIDEO, input_file, plan_input, prepare_run, stylize_inputs, user_errors, user_path

log = logging.getLogger("comfyui_std")


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


class STDLoadVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDLoadVideo",
            display_name="STD Load Video",
            category=CATEGORY_VIDEO,
            description="Loads a video (mp4, webm, mov, mkv, gif) or a folder of frames as an IMAGE batch, decoding "
                        "as a stream: with a frame cap it stops early and only kept frames are held in memory.",
            inputs=[
                io.Combo.Input("video", options=_input_videos(), upload=io.UploadType.video,
                               tooltip="A video in ComfyUI's input folder (the button uploads one)."),
                io.Int.Input("frame_load_cap", default=0, min=0, max=100000,
                             tooltip="Keep at most this many frames (0 = all)."),
                io.Int.Input("skip_first_frames", default=0, min=0, max=10000000,
                             tooltip="Drop this many frames first (counted after force_rate)."),
                io.Int.Input("select_every_nth", default=1, min=1, max=1000, tooltip="Then keep every nth frame."),
                io.Float.Input("force_rate", default=0.0, min=0.0, max=240.0, step=1.0,
                               tooltip="Resample to this frame rate by timestamps (0 = source rate)."),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default="crop",
                               tooltip="Make width and height multiples of 8: center crop, edge pad or stretch."),
                io.String.Input("path", default="", optional=True,
                                tooltip="Optional video file or folder of frames instead of video: relative to the "
                                        "input folder, or absolute inside the input/output folders (the server owner "
                                        "can allow more with the STD_ALLOWED_PATHS environment variable)."),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     io.Int.Output(display_name="frame_count"),
                     io.Float.Output(display_name="fps"),
                     io.Int.Output(display_name="source_width"),
                     io.Int.Output(display_name="source_height")],
        )

    @classmethod
    def fingerprint_inputs(cls, video, frame_load_cap=0, skip_first_frames=0, select_every_nth=1, force_rate=0.0,
                           resize="crop", path=""):
        try:
            p = _resolve(video, path)
            return f"{p}:{p.stat().st_mtime_ns}"
        except (OSError, ValueError):
            return ""

    @classmethod
    @user_errors
    def execute(cls, video, frame_load_cap=0, skip_first_frames=0, select_every_nth=1, force_rate=0.0,
                resize="crop", path="") -> io.NodeOutput:
        frames, info = load_video(_resolve(video, path), frame_load_cap, skip_first_frames, select_every_nth,
                                  force_rate, resize)
        text = (f"{info.frame_count} frames at {info.fps:g} fps, {info.width}x{info.height} "
                f"(source {info.source_width}x{info.source_height} at {info.source_fps:g} fps; "
                f"{info.decoded_frames} decoded)")
        return io.NodeOutput(frames, info.frame_count, float(info.fps), info.source_width, info.source_height,
                             ui={"text": [text]})


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
                io.Int.Input("frames_per_batch", default=16, min=1, max=4096,
                             tooltip="Frames sampled together; bounds peak memory."),
                io.Int.Input("overlap", default=0, min=0, max=4095,
                             tooltip="Frames shared by consecutive chunks, cross-faded to hide seams "
                                     "(must be below frames_per_batch)."),
                io.Combo.Input("noise", options=list(NOISE_MODES), default="shared",
                               tooltip="shared: every frame gets the same noise, so static regions stay identical "
                                       "(temporally consistent); per_frame: independent noise per frame."),
                plan_input(),
            ],
            outputs=[io.Latent.Output(tooltip="Stylized frames; decode with the same VAE.")],
        )

    @classmethod
    @user_errors
    def execute(cls, model, positive, negative, latent_image, seed, nfe=8, start_strength=0.75, gamma=0.0, cfg=6.0,
                frames_per_batch=16, overlap=0, noise="shared", plan="official") -> io.NodeOutput:
        gamma, noise = check_gamma(gamma), check_noise_mode(noise)
        p, sigmas, samples = prepare_run(model, nfe, start_strength, plan, latent_image)
        chunks = len(chunk_ranges(samples.shape[0], frames_per_batch, overlap))
        out = sample_std_chunks(model, positive, negative, latent_image, samples, sigmas, seed, gamma, cfg,
                                noise=noise, frames_per_batch=frames_per_batch, overlap=overlap)
        text = p.describe() + f"; {samples.shape[0]} frames in {chunks} chunk(s)"
        log.info(text)
        return io.NodeOutput(out, ui={"text": [text]})


class STDSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDSaveVideo",
            display_name="STD Save Video",
            category=CATEGORY_VIDEO,
            description="Saves an IMAGE batch as mp4 (h264), webm (vp9), animated webp or gif in the output folder.",
            inputs=[
                io.Image.Input("images", tooltip="Frames to save, in order."),
                io.Float.Input("fps", default=8.0, min=FPS_RANGE[0], max=FPS_RANGE[1], step=0.01,
                               tooltip="Frame rate of the file (connect STD Load Video's fps); gif plays at most "
                                       "50 fps."),
                io.String.Input("filename_prefix", default="STD/video", tooltip="Prefix inside the output folder."),
                io.Combo.Input("format", options=list(SAVE_FORMATS), default="mp4", tooltip="Container and codec."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    @user_errors
    def execute(cls, images, fps=8.0, filename_prefix="STD/video", format="mp4") -> io.NodeOutput:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
            raise ValueError("images: expected an IMAGE batch [frames, height, width, 3]")
        prefix = os.path.normpath(str(filename_prefix or "").strip())
        if not prefix or prefix == "." or os.path.isabs(prefix) or prefix.split(os.sep)[0] == "..":
            raise ValueError(f"filename_prefix: '{filename_prefix}' must be a name inside the output folder "
                             "(subfolders allowed, e.g. STD/video)")
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), images.shape[2], images.shape[1])
        file = f"{filename}_{counter:05}_.{format}"
        save_video(images, Path(folder) / file, fps, format)
        result = ui.SavedResult(file, subfolder, io.FolderType.output)
        if format in ("mp4", "webm"):
            return io.NodeOutput(ui=ui.PreviewVideo([result]))
        return io.NodeOutput(ui={"images": [dict(result)], "animated": (True,)})


NODES = [STDLoadVideo, STDStylizeVideo, STDSaveVideo]
