"""``python -m training.std``: distil a personal STD style LoRA (see training/README.md)."""

from __future__ import annotations

import sys

from training.common.cli import train
from training.std.method import PRESETS, STDConfig, STDMethod

DESCRIPTION = ("Single-trajectory distillation (STD) of a few-step style-transfer LoRA on one GPU. Every option can "
               "come from --preset, --config FILE or the command line (in that order).")


def main(argv=None) -> int:
    return train(STDMethod, STDConfig, PRESETS, argv, "python -m training.std", DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
