"""The suite insists on the compiled kernels: without these checks every kernel test would skip
quietly where nbp_mega._C did not build. Fails where nbp_mega._C does not import, and where an
nvcc is found (as setup.py finds it: $CUDA_HOME/bin/nvcc) but the CUDA kernels were not
compiled.

Opt out with NBP_ALLOW_MISSING_EXTENSION=1 (a machine without a C++ compiler, say: the suite
then tests the pure-PyTorch paths and the kernel tests skip). NBP_BUILD_CUDA=0, as for the
build, waives only the CUDA kernels (an nvcc that does not match torch's CUDA version).
"""

from __future__ import annotations

import os

import pytest
import torch

from nbp_mega.ops import fused
from tests.setup_py import load_setup_py

ALLOW_MISSING = os.environ.get("NBP_ALLOW_MISSING_EXTENSION") == "1"
REBUILD = ("`rm -f .venv/.installed && make test` rebuilds it, and fails with the reason if "
           "it cannot; NBP_ALLOW_MISSING_EXTENSION=1 runs the tests without it")
pytestmark = pytest.mark.skipif(ALLOW_MISSING, reason="NBP_ALLOW_MISSING_EXTENSION=1")


def test_extension_is_built():
    if not fused.AVAILABLE:
        pytest.fail(f"nbp_mega._C does not import ({fused.IMPORT_ERROR}). {REBUILD}.",
                    pytrace=False)


@pytest.mark.skipif(os.environ.get("NBP_BUILD_CUDA") == "0", reason="NBP_BUILD_CUDA=0")
def test_cuda_kernels_are_built_where_nvcc_is_found():
    setup_py = load_setup_py()
    nvcc = setup_py.find_nvcc()
    if nvcc is None:
        pytest.skip(f"no nvcc (CUDA_HOME={setup_py.CUDA_HOME}): the CPU kernels only")
    if not fused.AVAILABLE:
        pytest.skip("nbp_mega._C is not built (test_extension_is_built says why)")
    if not fused.CUDA_COMPILED:
        problem = setup_py.cuda_mismatch(nvcc, setup_py.nvcc_version_text(nvcc),
                                         torch.version.cuda)
        why = f"setup.py: {problem}" if problem else "its CUDA build failed, or predates nvcc"
        pytest.fail(f"{nvcc} is there, but {fused.build_info()['path']} has no CUDA kernels "
                    f"({why}). {REBUILD}; NBP_BUILD_CUDA=0 waives the CUDA kernels.",
                    pytrace=False)
    assert fused.build_info()["cuda"]["archs"], fused.build_info()
