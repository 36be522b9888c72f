"""Evaluate a trained model (FVD, validation by position, temporal consistency, tokenizer
reconstruction): a thin wrapper of nbp_mega.eval.cli, whose docstring has the usage.

    python tools/evaluate.py CONFIG [key=value ...] [--watch RUN_DIR [--once]]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbp_mega.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
