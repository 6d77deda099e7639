"""``python -m training.std``: distil a personal STD style LoRA (see training/README.md)."""

from __future__ import annotations

import logging
import sys

from training.common.config import config_from_argv
from training.std.method import PRESETS, STDConfig, STDMethod

DESCRIPTION = ("Single-trajectory distillation (STD) of a few-step style-transfer LoRA on one GPU. Every option can "
               "come from --preset, --config FILE or the command line (in that order).")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.common.trainer import NaNLossError, Trainer
    from training.std.bank import BankDiskFullError

    try:
        cfg = config_from_argv(STDConfig, PRESETS, argv, "python -m training.std", DESCRIPTION)
        Trainer(cfg, STDMethod).run()
    except (ValueError, FileNotFoundError, NaNLossError, BankDiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NaNLossError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
