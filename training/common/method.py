"""The contract between the trainer skeleton (:class:`training.common.trainer.Trainer`) and a training method.

STD (:class:`training.std.method.STDMethod`) and SiD-LSG (:class:`training.sid_lsg.method.SiDMethod`) implement it; a
new method implements it and gets the skeleton's loop, precision, gradient sync, checkpoints, exact resume,
previews, logs and CLI (:func:`training.common.cli.run`) for free.

Order of calls in a run::

    method = Method(cfg, trainer)
    method.setup()                                   # load models, data, method state; validate cfg
    groups = method.param_groups()                   # one optimiser (AdamW, method.adam_betas) per group
    [trainer restores a checkpoint: load_trainable_state(), load_state(); optimiser, scheduler, RNG states]
    for step in range(start, max_steps):
        for phase in method.phases:                  # (None,) for a single-phase method
            for micro in range(grad_accum):
                for name, loss, logs in method.micro_step(micro_step, phase):
                    backward(loss / grad_accum)      # <- the generator is suspended during this
            sync, clip and step the optimisers of this phase (all of them for phase None)
        method.after_optimizer_step()
        [every N steps: checkpoint (trainable_state, save_state), preview(), export()]
    export()
    method.close()                                   # optional: always, also after an error (worker processes)

The generator contract of ``micro_step`` (the part that is easy to get wrong):

* ``micro_step(micro_step)`` (or ``micro_step(micro_step, phase)`` when ``phases`` is set) is a generator yielding
  ``(optimiser name, loss tensor, {log name: float})``. The skeleton calls ``backward()`` on each yielded loss
  *before* it resumes the generator, so code after a ``yield`` runs after that loss's backward pass. STD uses this
  for its discriminator: the student's loss (with the adversarial generator term) is yielded first, its backward
  runs, and only then does the second half compute the discriminator loss on the detached fake, so the two graphs
  never share a backward and the discriminator's gradients never see the generator term.
* Every loss must be finite: a NaN/Inf stops the run before the optimiser step.
* All randomness of a micro-step must come from ``trainer.generator(micro_step, salt)`` (a generator seeded with
  the run seed, the rank and the micro-step) or from state the method checkpoints (e.g. the trajectory bank's
  generator); then a resumed run repeats the uninterrupted one exactly.
* The losses are plain tensors; the skeleton scales them (``/ grad_accum`` and, under fp16, by a gradient scaler per
  optimiser), so a method never calls ``backward`` itself.

Attributes and methods:

``name`` (str)
    Written into checkpoints; a resume of another method's checkpoint is refused.
``phases`` (tuple, optional)
    Optimiser names updated in turn within one step (SiD-LSG: ``("fake", "gen")``); absent = one phase stepping
    every optimiser.
``adam_betas`` (tuple, optional)
    AdamW betas for every optimiser (default (0.9, 0.999); SiD-LSG uses (0, 0.999)).
``setup()``
    Load everything; raise :class:`~comfyui_std.core.errors.STDInputError` for bad settings or files.
``param_groups() -> {name: (params, lr, max_grad_norm)}``
    Trained parameters per optimiser (fp32 tensors), their learning rate and gradient clip (0 = none).
``micro_step(micro_step[, phase])``
    The generator described above.
``after_optimizer_step()``
    After the optimisers stepped (EMA updates).
``trainable_state() -> {name: tensor}`` / ``load_trainable_state(state)``
    Every trained tensor (and EMA copies, discriminator weights): saved as safetensors in each checkpoint.
``save_state(folder, rank)`` / ``load_state(folder, rank)``
    Other method state (the trajectory bank, counters), per rank, as safetensors/JSON files in the checkpoint
    folder; never pickles.
``preview() -> PIL.Image | None``
    A grid for previews/TensorBoard (cheap: the skeleton calls it every ``preview_every`` steps).
``export(folder, suffix="") -> [paths]``
    Write the result files (LoRAs with ``std.*`` metadata) through :mod:`training.common.export`
    (``atomic_save`` for files, ``atomic_folder`` for folders): each appears complete under its name, world-readable
    (0644), or not at all.
``close()`` (optional)
    Release what outlives a step (STD: its data worker processes); called once when the run ends, however it ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import torch


class Method(Protocol):
    name: str

    def __init__(self, cfg, trainer) -> None: ...

    def setup(self) -> None: ...

    def param_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float, float]]: ...

    def micro_step(self, micro_step: int, *phase) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]: ...

    def after_optimizer_step(self) -> None: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_state(self, folder: Path, rank: int) -> None: ...

    def load_state(self, folder: Path, rank: int) -> None: ...

    def preview(self): ...

    def export(self, folder: Path, suffix: str = "") -> list[Path]: ...
