"""Library chatter kept off the user's screen at the entry points (the app, the batch CLI).

transformers and diffusers log things that say nothing to a user of this project: transformers' "requires
torchvision ... falling back to ...ImageProcessorPil" (this project uses the PIL processors on purpose), its
"Writing model shards" bar when the tiny zoo is written, diffusers' "modules ... should be kept in float32: []"
when a model is cast (the list is empty) and "No LoRA keys associated to CLIPTextModel" for the UNet-only STD LoRAs
(the project checks and reports what a LoRA applies itself). :func:`quiet_libraries` sets both libraries to errors
only; ``--verbose`` leaves them as they are. The project's own messages are not affected.
"""

from __future__ import annotations


def quiet_libraries(verbose: bool = False) -> None:
    if verbose:
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
