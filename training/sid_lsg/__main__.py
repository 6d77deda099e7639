"""``python -m training.sid_lsg``: distil a one-step text-to-image generator (LoRA) from prompts alone."""

from __future__ import annotations

import sys

from training.common.cli import train
from training.sid_lsg.method import PRESETS, SiDConfig, SiDMethod

DESCRIPTION = ("SiD-LSG: data-free one-step distillation of Stable Diffusion into a LoRA generator, from a prompt "
               "file. Options from --preset, --config FILE or the command line (in that order).")


def main(argv=None) -> int:
    return train(SiDMethod, SiDConfig, PRESETS, argv, "python -m training.sid_lsg", DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
