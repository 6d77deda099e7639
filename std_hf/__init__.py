"""Diffusers-side model loading shared by the Gradio app (``std_app``) and the trainers (``training``).

* :mod:`.files`: where a model file is (a path, a name in a ComfyUI ``models`` folder, a Hub reference) and the
  messages when it is not there;
* :mod:`.base`: SD1.5 / SDXL base models from a single-file checkpoint (LDM layout, offline: configs read from the
  tensors, CLIP tokenizer files from ComfyUI or a folder you name), a diffusers folder or a Hub id; every tensor is
  loaded strictly and counted (``python -m training.check_base`` prints the counts);
* :mod:`.ldm`: the LDM <-> diffusers key maps and configs from shapes;
* :mod:`.lora`: reading LoRA files, checking that they fit a UNet, their per-layer factors and merging;
* :mod:`.ip_adapter`: IP-Adapter files and CLIP image encoders (folders and ComfyUI single files);
* :mod:`.tiny`: the tiny random models the tests, ``--tiny`` and the ``tiny`` trainer preset run on.

Like ``std_app``, nothing here is imported when ComfyUI loads the node pack (``comfyui_std`` stays free of diffusers).
"""
