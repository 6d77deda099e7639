"""ComfyUI entry point: ``git clone`` this repository into ``ComfyUI/custom_nodes/`` and restart ComfyUI.

Kept light on purpose: it loads the node definitions only (no gradio, no training code).
"""

try:
    from .comfyui_std.nodes import comfy_entrypoint
except ImportError as err:  # imported outside ComfyUI (e.g. by pytest collecting this repository)
    # Without ComfyUI the node modules cannot import comfy; and in a checkout whose folder name is not a package
    # name (a clone named comfyui-std) pytest imports this file as a plain module, where a relative import fails.
    outside_comfy = isinstance(err, ModuleNotFoundError) and err.name in ("comfy", "comfy_api", "latent_preview",
                                                                               "folder_paths")
    if __package__ and not outside_comfy:
        raise
    __all__ = []
else:
    WEB_DIRECTORY = "./web"
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
