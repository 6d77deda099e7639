"""ComfyUI entry point: ``git clone`` this repository into ``ComfyUI/custom_nodes/`` and restart ComfyUI.

Kept light on purpose: it loads the node definitions only (no gradio, no training code).
"""

try:
    from .comfyui_std.nodes import comfy_entrypoint
except ModuleNotFoundError as err:  # imported outside ComfyUI (e.g. by pytest collecting this repository)
    if err.name not in ("comfy", "comfy_api", "latent_preview"):
        raise
    __all__ = []
else:
    WEB_DIRECTORY = "./web"
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
