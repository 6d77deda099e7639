"""``python -m training.sid_lsg``: distil a one-step text-to-image generator (LoRA) from prompts alone."""

from __future__ import annotations

import logging
import sys

from training.common.config import build_parser, resolve
from training.sid_lsg.method import PRESETS, SiDConfig, SiDMethod


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = build_parser(SiDConfig, "python -m training.sid_lsg",
                      "SiD-LSG: data-free one-step distillation of Stable Diffusion into a LoRA generator, from a "
                      "prompt file. Options from --preset, --config FILE or the command line (in that order).",
                      PRESETS)
    args = ap.parse_args(argv)
    from training.common.trainer import NaNLossError, Trainer

    try:
        cfg = resolve(SiDConfig, args, PRESETS)
        if cfg.output == "output/std":
            cfg.output = "output/sid_lsg"
        Trainer(cfg, SiDMethod).run()
    except (ValueError, FileNotFoundError, NaNLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NaNLossError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
