"""The repository's setup.py as a module, for tests of its build decisions. Importing it builds
nothing and reads no toolkit: setup() runs only under __name__ == "__main__"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_setup_py():
    spec = importlib.util.spec_from_file_location("nbp_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
