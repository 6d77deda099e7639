"""``python -m training.sid_lsg``: distil a one-step text-to-image generator (LoRA) from prompts alone."""

from __future__ import annotations

import logging
import sys

from training.common.config import config_from_argv
from training.sid_lsg.method import PRESETS, SiDConfig, SiDMethod

DESCRIPTION = ("SiD-LSG: data-free one-step distillation of Stable Diffusion into a LoRA generator, from a prompt "
               "file. Options from --preset, --config FILE or the command line (in that order).")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.common.trainer import NaNLossError, Trainer

    try:
        cfg = config_from_argv(SiDConfig, PRESETS, argv, "python -m training.sid_lsg", DESCRIPTION)
        if cfg.output == "output/std":
            cfg.output = "output/sid_lsg"
        Trainer(cfg, SiDMethod).run()
    except (ValueError, FileNotFoundError, NaNLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NaNLossError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
