"""STD (Single Trajectory Distillation) style transfer: ComfyUI nodes over a pure-torch core.

Importing this package is cheap: it loads neither ComfyUI, diffusers, gradio nor the trainer. ComfyUI reaches the
nodes through :mod:`comfyui_std.nodes` (see the repository's root ``__init__.py``).
"""

__version__ = "0.2.0"
