"""setup.py's build decisions: an nvcc that does not match torch's CUDA, or a CUDA build that
fails, still gives a working nbp_mega._C with the CPU kernels and says why; without a working
C++ compiler the package still builds (without nbp_mega._C); NBP_REQUIRE_EXTENSION=1 turns each
of these into an error that names the reason.

The builds are the real `setup.py build_ext`, run from the repository with a fake CUDA_HOME
(bin/nvcc answers --version like a real nvcc and fails anything else) and the output in
tmp_path, so the installed in-place nbp_mega/_C*.so is not touched. Only two of them compile,
and the same CPU objects: those are kept in the pytest cache, so only a checkout's first run
compiles (about 2 minutes on 2 cores) and later ones link. The other builds stop before
anything compiles.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.setup_py import ROOT, load_setup_py

setup_py = load_setup_py()
TORCH_CUDA = torch.version.cuda  # "13.0" for the pinned torch; None for a CPU-only build
# A release of another major version than torch's (the cluster case: CUDA 12 nvcc, CUDA 13 torch).
MISMATCHED = "11.8" if TORCH_CUDA and TORCH_CUDA.startswith("12.") else "12.4"
needs_cuda_torch = pytest.mark.skipif(TORCH_CUDA is None, reason="torch is a CPU-only build")
BUILD_ENV = ("NBP_REQUIRE_EXTENSION", "NBP_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_PATH")

NVCC_VERSION = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Cuda compilation tools, release {release}, V{release}.131
Build cuda_{release}.r{release}/compiler.34097967_0
"""
FAKE_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then
  cat <<'EOF'
{version}EOF
  exit 0
fi
echo "fake nvcc: cannot compile $*" >&2
exit 1
"""

# Loads the built file itself (not nbp_mega._C, which is the repository's in-place build) and
# runs the CPU kernel once: with one block covering all keys it is plain attention.
LOAD_EXTENSION = """
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("nbp_mega._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
q, k, v = torch.randn(3, 1, 2, 24, 32).unbind(0)
out, lse = torch.ops.nbp_mega.block_causal_attention(q, k, v, 24, 0, 0, 32 ** -0.5)
torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
print(json.dumps({"file": C.__file__, "with_cuda": C.with_cuda}))
"""


def fake_toolkit(root: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc claims CUDA `release` ("12.4")."""
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(FAKE_NVCC.format(version=NVCC_VERSION.format(release=release)))
    nvcc.chmod(0o755)
    return root


@pytest.fixture
def build(tmp_path, request):
    """build(**env) -> (completed process with stdout + stderr in .stdout, built .so or None).

    Objects go to the pytest cache when compiled=True (the CPU builds), else to tmp_path."""
    cache = request.config.cache.mkdir("nbp_build_objects")

    def run(compiled: bool = False, **env):
        temp, lib = (cache if compiled else tmp_path / "temp"), tmp_path / "lib"
        env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV} | env
        command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib),
                   "--build-temp", str(temp)]
        with open(cache / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time over the cached objects
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=1800)
        built = sorted(lib.glob("nbp_mega/_C*.so"))
        return done, (built[0] if built else None)

    return run


def load_built(path: Path, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_EXTENSION, str(path)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# The decision itself (cheap).


@pytest.mark.parametrize("release, torch_cuda, expected", [
    ("13.0", "13.0", None),
    ("13.1", "13.0", None),  # a minor mismatch only warns, in torch too
    ("12.8", "12.4", None),
    ("12.4", "13.0", "is CUDA 12.4, but torch"),
    ("13.0", "12.8", "is CUDA 13.0, but torch"),
    ("13.0", None, "CPU-only build"),
])
def test_cuda_mismatch_follows_torchs_major_version_rule(release, torch_cuda, expected):
    text = NVCC_VERSION.format(release=release)
    problem = setup_py.cuda_mismatch("/opt/cuda/bin/nvcc", text, torch_cuda)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem
        assert torch_cuda is None or f"/opt/cuda/bin/nvcc is CUDA {release}, but torch" in problem
        assert torch_cuda is None or f"CUDA {torch_cuda}" in problem


def test_cuda_mismatch_refuses_an_nvcc_whose_version_is_unknown():
    assert "failed" in setup_py.cuda_mismatch("nvcc", None, "13.0")
    assert "names no CUDA release" in setup_py.cuda_mismatch("nvcc", "nvcc 13\n", "13.0")


def test_nvcc_version_text_runs_nvcc_and_survives_a_broken_one(tmp_path):
    nvcc = fake_toolkit(tmp_path / "cuda", "12.4") / "bin" / "nvcc"
    assert "release 12.4, V12.4.131" in setup_py.nvcc_version_text(str(nvcc))
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    assert setup_py.nvcc_version_text(str(nvcc)) is None
    assert setup_py.nvcc_version_text(str(tmp_path / "missing")) is None


@needs_cuda_torch
def test_cuda_wanted_only_for_a_usable_nvcc(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NBP_BUILD_CUDA", raising=False)
    monkeypatch.setattr(setup_py, "REQUIRE_EXTENSION", False)
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(fake_toolkit(tmp_path / "ok", TORCH_CUDA)))
    assert setup_py.cuda_wanted()
    monkeypatch.setenv("NBP_BUILD_CUDA", "0")
    assert not setup_py.cuda_wanted()
    monkeypatch.delenv("NBP_BUILD_CUDA")
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(tmp_path))  # no bin/nvcc
    assert not setup_py.cuda_wanted()
    assert "no nvcc" in capsys.readouterr().err
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(fake_toolkit(tmp_path / "old", MISMATCHED)))
    assert not setup_py.cuda_wanted()
    warning = capsys.readouterr().err
    assert f"WITHOUT its CUDA kernels: {tmp_path}/old/bin/nvcc is CUDA {MISMATCHED}" in warning
    assert "NBP_BUILD_CUDA=0" in warning and "CUDA_HOME" in warning


@needs_cuda_torch
def test_cuda_wanted_exits_with_the_reason_under_require_extension(tmp_path, monkeypatch):
    monkeypatch.delenv("NBP_BUILD_CUDA", raising=False)
    monkeypatch.setattr(setup_py, "REQUIRE_EXTENSION", True)
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(fake_toolkit(tmp_path, MISMATCHED)))
    with pytest.raises(SystemExit, match=f"is CUDA {MISMATCHED}, but torch .* CUDA {TORCH_CUDA}"):
        setup_py.cuda_wanted()


def test_cuda_wanted_with_a_cpu_only_torch_says_to_install_a_cuda_one(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.delenv("NBP_BUILD_CUDA", raising=False)
    monkeypatch.setattr(setup_py, "REQUIRE_EXTENSION", False)
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(fake_toolkit(tmp_path, "13.0")))
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not setup_py.cuda_wanted()
    assert "is a CPU-only build" in capsys.readouterr().err


def test_the_in_place_extension_is_replaced_not_rewritten(tmp_path):
    from setuptools import Distribution

    built, in_place = tmp_path / "built.so", tmp_path / "in_place.so"
    built.write_bytes(b"new")
    in_place.write_bytes(b"old")
    with open(in_place, "rb") as loaded:  # as a process that has the old library mapped
        setup_py.BuildKernels(Distribution()).copy_file(str(built), str(in_place))
        assert loaded.read() == b"old"
    assert in_place.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [built, in_place]


# Real builds.


@needs_cuda_torch
def test_mismatched_toolkit_builds_the_cpu_kernels_and_says_why(build, tmp_path):
    cuda = fake_toolkit(tmp_path / "cuda", MISMATCHED)
    done, built = build(compiled=True, CUDA_HOME=str(cuda))
    assert done.returncode == 0, done.stdout[-5000:]
    assert (f"WARNING: building nbp_mega._C WITHOUT its CUDA kernels: {cuda}/bin/nvcc is CUDA "
            f"{MISMATCHED}, but torch {torch.__version__} was built with CUDA {TORCH_CUDA}"
            in done.stdout), done.stdout[-5000:]
    assert built is not None, done.stdout[-5000:]
    assert load_built(built, tmp_path) == {"file": str(built), "with_cuda": 0}


@needs_cuda_torch
def test_failed_cuda_build_is_redone_with_the_cpu_kernels(build, tmp_path):
    # An nvcc torch accepts, and an architecture list torch rejects when it compiles the first
    # .cu file: a CUDA build that fails inside build_extension, before ninja runs.
    cuda = fake_toolkit(tmp_path / "cuda", TORCH_CUDA)
    done, built = build(compiled=True, CUDA_HOME=str(cuda), TORCH_CUDA_ARCH_LIST="1.0",
                        TORCH_DONT_CHECK_COMPILER_ABI="1")
    assert done.returncode == 0, done.stdout[-5000:]
    assert "building nbp_mega._C with the CPU and CUDA kernels" in done.stdout
    assert ("WARNING: the CUDA kernels of nbp_mega._C failed to build: Unknown CUDA arch (1.0)"
            in done.stdout), done.stdout[-5000:]
    assert built is not None, done.stdout[-5000:]
    assert load_built(built, tmp_path) == {"file": str(built), "with_cuda": 0}


def test_without_a_compiler_the_package_builds_without_the_extension(build, tmp_path):
    done, built = build(NBP_BUILD_CUDA="0", CXX="false", CC="false")
    assert done.returncode == 0, done.stdout[-5000:]
    assert "WARNING: nbp_mega._C was NOT built" in done.stdout, done.stdout[-5000:]
    assert built is None


@needs_cuda_torch
def test_require_extension_fails_before_compiling_on_a_mismatched_toolkit(build, tmp_path):
    cuda = fake_toolkit(tmp_path / "cuda", MISMATCHED)
    done, built = build(CUDA_HOME=str(cuda), NBP_REQUIRE_EXTENSION="1")
    assert done.returncode != 0 and built is None
    assert (f"error: cannot build the CUDA kernels of nbp_mega._C: {cuda}/bin/nvcc is CUDA "
            f"{MISMATCHED}" in done.stdout), done.stdout[-5000:]
    assert "running build_ext" not in done.stdout  # it stopped before setup() ran


@needs_cuda_torch
def test_require_extension_fails_on_a_failed_cuda_build(build, tmp_path):
    cuda = fake_toolkit(tmp_path / "cuda", TORCH_CUDA)
    done, built = build(CUDA_HOME=str(cuda), TORCH_CUDA_ARCH_LIST="1.0",
                        TORCH_DONT_CHECK_COMPILER_ABI="1", NBP_REQUIRE_EXTENSION="1")
    assert done.returncode != 0 and built is None
    assert "Unknown CUDA arch (1.0)" in done.stdout, done.stdout[-5000:]
    assert "building the CPU kernels only" not in done.stdout
