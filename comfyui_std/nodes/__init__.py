"""ComfyUI front end of the STD pack (V3 node schema, ComfyUI >= 0.3.48).

Importing this module imports ComfyUI (``comfy``, ``comfy_api``); it is only loaded by ComfyUI through the
repository's root ``__init__.py``.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .images import NODES as IMAGE_NODES
from .lora_loader import NODES as LORA_NODES
from .motion_lora import NODES as MOTION_LORA_NODES
from .onestep import NODES as ONESTEP_NODES
from .sampling import NODES as SAMPLING_NODES
from .style import NODES as STYLE_NODES
from .video import NODES as VIDEO_NODES

ALL_NODES: list[type[io.ComfyNode]] = [*SAMPLING_NODES, *LORA_NODES, *MOTION_LORA_NODES, *STYLE_NODES, *VIDEO_NODES, *IMAGE_NODES, *ONESTEP_NODES]


class STDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(ALL_NODES)


async def comfy_entrypoint() -> STDExtension:
    return STDExtension()
