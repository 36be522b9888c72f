"""nbp_mega: semi-autoregressive Next-Block-Prediction video generation at scale.

`pip install -e . --no-build-isolation` (or `make install`) also compiles the fused attention
kernels in csrc/ into nbp_mega._C with ninja:
  - the CPU kernels always;
  - the CUDA kernels too when nvcc is found (CUDA_HOME, else PATH) and is of torch's CUDA major
    version (what torch's BuildExtension requires), for the architectures in
    TORCH_CUDA_ARCH_LIST (default "8.0;9.0": Ampere and Hopper; no GPU is needed to build);
    NBP_BUILD_CUDA=0 skips them.
Nothing here fails the install by default; each fallback prints why ("nbp_mega setup:" lines,
which `make install` shows): an nvcc of another CUDA major version, or one whose version
cannot be read, means the CPU kernels only; a CUDA build that fails (compiling, linking, or
torch's own toolkit checks) is redone with the CPU kernels only; a CPU build that fails
installs the package without nbp_mega._C (nbp_mega.ops then runs its pure-PyTorch path and
says so). NBP_REQUIRE_EXTENSION=1 (CI, `make test`) turns each of these into an error.

The decisions are functions that tests import (tests/setup_py.py): setup() runs only when this
file is run as a script, which is how pip's build backend runs it too.
"""

import glob
import os
import re
import subprocess
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0"
REQUIRE_EXTENSION = os.environ.get("NBP_REQUIRE_EXTENSION") == "1"
# How torch's BuildExtension reads `nvcc --version` (cpp_extension._check_cuda_version).
NVCC_RELEASE = re.compile(r"release (\d+)\.(\d+)")
# -fopenmp: at::parallel_for is OpenMP only in code compiled with it (torch's own libgomp is
# loaded first and shared). -ffp-contract=fast: fuse a * b + c into FMAs in the portable loops
# (-std=c++17 would otherwise forbid it).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]


def note(message: str) -> None:
    """One line of the build's own story (`make install` prints the lines it finds)."""
    print(f"nbp_mega setup: {message}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc, the compiler torch's BuildExtension runs (CUDA_HOME as torch found
    it: the environment variable, else nvcc on PATH, else /usr/local/cuda), if it exists."""
    if CUDA_HOME is None:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else None


def nvcc_version_text(nvcc: str) -> str | None:
    """What `nvcc --version` prints, or None where it does not run or fails."""
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True,
                              timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_mismatch(nvcc: str, version_text: str | None, torch_cuda: str | None) -> str | None:
    """Why `nvcc` (which printed `version_text` for --version) cannot build CUDA kernels for
    this torch (built with CUDA `torch_cuda`, None for a CPU-only build), or None if it can.

    torch's own rule: the major versions must agree; a minor mismatch (12.8 against 12.4) only
    warns. torch lets an unreadable version through; we don't, as nothing vouches for it then.
    """
    if torch_cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA libraries to link)"
    if version_text is None:
        return f"`{nvcc} --version` failed"
    release = NVCC_RELEASE.search(version_text)
    if release is None:
        return f"`{nvcc} --version` names no CUDA release ('release X.Y')"
    if int(release[1]) != int(torch_cuda.split(".")[0]):
        return (f"{nvcc} is CUDA {release[1]}.{release[2]}, but torch {torch.__version__} was "
                f"built with CUDA {torch_cuda} and torch requires the same major version")
    return None


def cuda_wanted() -> bool:
    """Whether to compile the CUDA kernels. Where an nvcc is found but cannot be used, says why
    and builds the CPU kernels only, or under NBP_REQUIRE_EXTENSION=1 exits with the reason."""
    if os.environ.get("NBP_BUILD_CUDA") == "0":
        note("building nbp_mega._C with the CPU kernels only (NBP_BUILD_CUDA=0)")
        return False
    nvcc = find_nvcc()
    if nvcc is None:
        note(f"building nbp_mega._C with the CPU kernels only: no nvcc (CUDA_HOME={CUDA_HOME})")
        return False
    problem = cuda_mismatch(nvcc, nvcc_version_text(nvcc), torch.version.cuda)
    if problem is None:
        return True
    fix = (f"point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit"
           if torch.version.cuda else "install a CUDA build of torch")
    if REQUIRE_EXTENSION:
        sys.exit(f"nbp_mega setup: error: cannot build the CUDA kernels of nbp_mega._C: "
                 f"{problem}. To fix it, {fix}, or set NBP_BUILD_CUDA=0 to build the CPU "
                 "kernels only.")
    note(f"WARNING: building nbp_mega._C WITHOUT its CUDA kernels: {problem}. To build them, "
         f"{fix}; NBP_BUILD_CUDA=0 skips them without this warning.")
    return False


def cpu_extension() -> CppExtension:
    """nbp_mega._C with the CPU kernels only."""
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    return CppExtension("nbp_mega._C", sources, extra_compile_args={"cxx": list(CXX_FLAGS)},
                        extra_link_args=["-fopenmp"])


def cuda_extension() -> CUDAExtension:
    """nbp_mega._C with the CPU and the CUDA kernels. NBP_WITH_CUDA (nbp_mega._C.with_cuda)
    means the .cu kernels are in the build; the torch-facing side of the CUDA ops
    (csrc/cuda/*.cpp) comes with them."""
    cpu = cpu_extension()
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    note(f"building nbp_mega._C with the CPU and CUDA kernels ({find_nvcc()}, archs {archs})")
    cxx = CXX_FLAGS + ["-DNBP_WITH_CUDA", f'-DNBP_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-DNBP_WITH_CUDA", "--expt-relaxed-constexpr"]
    return CUDAExtension("nbp_mega._C", cpu.sources + cuda_sources,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=cpu.extra_link_args)


def has_cuda(ext) -> bool:
    return any(source.endswith(".cu") for source in ext.sources)


def become_cpu_only(ext) -> None:
    """Turn ext into cpu_extension() in place (setuptools has annotated the object already)."""
    cpu = cpu_extension()
    for field in ("sources", "include_dirs", "library_dirs", "libraries", "extra_compile_args",
                  "extra_link_args"):
        setattr(ext, field, getattr(cpu, field))


class BuildKernels(BuildExtension):
    """torch's BuildExtension with the fallbacks of the module docstring.

    The hook is build_extensions, not build_extension: torch checks nvcc (and the host compiler
    against it) there, before anything compiles. The extension is never `optional` while it
    builds, since setuptools would then turn compile and link errors into bare warnings."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as error:  # torch's checks, ninja, compilers, linker: several types
            (ext,) = self.extensions
            if REQUIRE_EXTENSION:
                raise
            if has_cuda(ext):
                note(f"WARNING: the CUDA kernels of nbp_mega._C failed to build: {error} (see "
                     "the output above). Building the CPU kernels only; NBP_BUILD_CUDA=0 skips "
                     "the CUDA attempt, NBP_REQUIRE_EXTENSION=1 makes this an error.")
                become_cpu_only(ext)
                self.build_extensions()  # once more, now without CUDA
                return
            ext.optional = True  # so that setuptools installs the package without the .so
            note(f"WARNING: nbp_mega._C was NOT built: {error} (see the output above). "
                 "nbp_mega.ops will use its pure-PyTorch attention; NBP_REQUIRE_EXTENSION=1 "
                 "makes this an error.")

    def copy_file(self, infile, outfile, *args, **kwargs):
        """Put the built .so in place (pip install -e) by a rename, not by rewriting the old
        file: a process that has the old one loaded (training, a test) keeps it intact."""
        staged = f"{outfile}.{os.getpid()}.tmp"
        _, copied = super().copy_file(infile, staged, *args, **kwargs)
        os.replace(staged, outfile)
        return outfile, copied


if __name__ == "__main__":  # also under pip: its build backend runs this file as __main__
    setup(
        name="nbp_mega",
        version="0.1.0",
        description="Next-Block-Prediction video generation: Megatron-core TP + DeepSpeed ZeRO",
        packages=find_packages(include=["nbp_mega", "nbp_mega.*"]),
        ext_modules=[cuda_extension() if cuda_wanted() else cpu_extension()],
        cmdclass={"build_ext": BuildKernels.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=[
            "torch>=2.4",
            "deepspeed>=0.16",
            "megatron-core>=0.16,<0.17",
            "webdataset>=0.2.100",
            "sentencepiece",
            "numpy",
            "tensorboard",
            "ninja",
            "PyYAML",
            "tqdm",
        ],
    )
