"""Train a video tokenizer (see nbp_mega/tokenizer/train.py).

    python tools/train_tokenizer.py configs/tokenizer/tiny.yaml [key.sub=value ...]
    NPROC_PER_NODE=2 ... torchrun --nproc_per_node 2 tools/train_tokenizer.py CONFIG ...
"""

from __future__ import annotations

import json
import os
import sys

from nbp_mega.tokenizer.train import load_run_config, run
from nbp_mega.train import setup_logging


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 1
    config, overrides = (argv[0], argv[1:]) if "=" not in argv[0] else (None, argv)
    setup_logging(int(os.environ.get("RANK", "0")))  # rank 0 says what it resumed from
    record = run(load_run_config(config, overrides))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
