"""SiD-LSG toy check (see training/sid_lsg/toy.py): last line ``sid_toy_distance_shrink: X`` (goal >= 5)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.sid_lsg.toy import main  # noqa: E402

if __name__ == "__main__":
    main()
