import sys

from nbp_mega.eval.cli import main

sys.exit(main())
