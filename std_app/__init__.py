"""The STD Gradio app's back end: model files, tiny offline models, inference through diffusers, handlers.

The STD plan, the sampler, the video chunking/noise policy and the style-block presets come from
:mod:`comfyui_std.core`, the same code the ComfyUI nodes run. ``gradio_app.py`` at the repository root is the UI.
This package is never imported by the ComfyUI entry point.
"""
