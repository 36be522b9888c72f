"""`python -m nbp_mega.ops --info`: which attention backends are compiled and which is used.

Prints JSON: extension (built?, cpu isa, cuda compiled and its architectures, or the import
error), flex_available, cuda_device, selected (the implementation chosen at import) and routes
(where a call goes on each device).
"""

from __future__ import annotations

import argparse
import json

from nbp_mega.ops import describe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nbp_mega.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--info", action="store_true", help="print the backends as JSON")
    args = parser.parse_args(argv)
    if not args.info:
        parser.error("nothing to do: pass --info")
    print(json.dumps(describe(), indent=2))


if __name__ == "__main__":
    main()
