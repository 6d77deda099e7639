"""ComfyUI entry point: ``git clone`` this repository into ``ComfyUI/custom_nodes/`` and restart ComfyUI.

Kept light on purpose: it loads the node definitions only (no gradio, no training code).
"""

from .comfyui_std.nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
