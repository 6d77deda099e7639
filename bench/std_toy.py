"""STD vs consistency distillation on the exact-GMM toy (see training/std/toy.py); last line
``bank_step_time_ratio: X`` (STD with the bank vs a plain CD step; goal <= 1.1)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.std.toy import main  # noqa: E402

if __name__ == "__main__":
    main()
