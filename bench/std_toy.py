"""STD vs consistency distillation on a toy with an imperfect teacher (see training/std/toy.py); last line
``std_toy_nfe4_error_vs_base: X`` (STD's error over the undistilled base's at NFE 4, η 0.75; goal < 0.8)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.std.toy import main  # noqa: E402

if __name__ == "__main__":
    main()
