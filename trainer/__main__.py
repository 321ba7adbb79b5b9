"""`python -m trainer` / `upgrader-train`: see `trainer/train.py`."""

from __future__ import annotations

import sys

from trainer.train import main

if __name__ == "__main__":
    sys.exit(main())
