"""STDLoadImageFolder: a folder of images from ComfyUI's input folder as one IMAGE batch (batch stylization)."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..core.images import MISMATCH_MODES, SORT_ORDERS, load_image_folder
from ..core.frames import RESIZE_MODES
from .comfy_compat import OWN_CHECK
from .common import CATEGORY_LOADERS, input_file, user_errors

log = logging.getLogger("comfyui_std")


def _input_folders() -> list[str]:
    d = folder_paths.get_input_directory()
    try:
        return sorted(f for f in os.listdir(d) if os.path.isdir(os.path.join(d, f)) and not f.startswith("."))
    except OSError:
        return []


class STDLoadImageFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STDLoadImageFolder",
            display_name="STD Load Image Folder",
            category=CATEGORY_LOADERS,
            description="Loads the images of a folder inside ComfyUI's input folder as one IMAGE batch (with the "
                        "alpha channels as a MASK batch), e.g. to stylize a whole folder with STD Stylize.",
            inputs=[
                io.Combo.Input("folder", options=_input_folders(), tooltip="A folder inside ComfyUI's input folder."),
                io.Int.Input("image_load_cap", default=0, min=0, max=100000,
                             tooltip="Load at most this many images (0 = all)."),
                io.Int.Input("skip_first_images", default=0, min=0, max=10000000,
                             tooltip="Skip this many images first (in sort order)."),
                io.Combo.Input("sort", options=list(SORT_ORDERS), default="natural",
                               tooltip="name: by file name; natural: img2 before img10; modified: oldest first."),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default="crop",
                               tooltip="Make width and height multiples of 8: center crop, edge pad or stretch."),
                io.Combo.Input("mismatch", options=list(MISMATCH_MODES), default="refuse",
                               tooltip="Images of another size than the first: refuse (the node names the file), "
                                       "or scale-and-crop / stretch them to the first image's size."),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     io.Mask.Output(display_name="masks", tooltip="1 - alpha (0 where an image has no alpha)."),
                     io.Int.Output(display_name="count"),
                     io.String.Output(display_name="names", tooltip="The file names, one per line, in order.")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        """ComfyUI leaves ``folder`` to this node, which checks it when it runs (see comfy_compat)."""
        return OWN_CHECK

    @classmethod
    def fingerprint_inputs(cls, folder, image_load_cap=0, skip_first_images=0, sort="natural", resize="crop",
                           mismatch="refuse"):
        try:
            path = input_file(folder, "folder")
            return ";".join(f"{e.name}:{e.stat().st_mtime_ns}" for e in sorted(os.scandir(path), key=lambda e: e.name))
        except (OSError, ValueError):
            return ""

    @classmethod
    @user_errors
    def execute(cls, folder, image_load_cap=0, skip_first_images=0, sort="natural", resize="crop",
                mismatch="refuse") -> io.NodeOutput:
        images, alphas, info = load_image_folder(input_file(folder, "folder"), image_load_cap, skip_first_images, sort,
                                                 resize, mismatch)
        text = f"{folder}: {info.describe()}"
        log.info(text)
        return io.NodeOutput(images, 1.0 - alphas, len(info.names), "\n".join(info.names), ui={"text": [text]})


NODES = [STDLoadImageFolder]
