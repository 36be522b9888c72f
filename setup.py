"""nbp_mega: semi-autoregressive Next-Block-Prediction video generation at scale.

`pip install -e . --no-build-isolation` (or `make install`) also compiles the fused attention
kernels in csrc/ into nbp_mega._C with ninja:
  - the CPU kernels always;
  - the CUDA kernels too when nvcc is found (CUDA_HOME, else PATH), for the architectures in
    TORCH_CUDA_ARCH_LIST (default "8.0;9.0": Ampere and Hopper; no GPU is needed to build);
    NBP_BUILD_CUDA=0 skips them.
A failed build warns and installs the package without nbp_mega._C (nbp_mega.ops then runs its
pure-PyTorch path and says so), unless NBP_REQUIRE_EXTENSION=1 (CI): then it fails the install.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0"
REQUIRE_EXTENSION = os.environ.get("NBP_REQUIRE_EXTENSION") == "1"


def _nvcc_found() -> bool:
    if os.environ.get("NBP_BUILD_CUDA") == "0":
        return False
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _kernels_extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is OpenMP only in code compiled with it (torch's own libgomp
    # is loaded first and shared). -ffp-contract=fast: fuse a * b + c into FMAs in the portable
    # loops (-std=c++17 would otherwise forbid it).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    common = dict(extra_link_args=["-fopenmp"], optional=not REQUIRE_EXTENSION)
    # NBP_WITH_CUDA (nbp_mega._C.with_cuda) means the .cu kernels are in the build; the
    # torch-facing side of the CUDA ops (csrc/cuda/*.cpp) comes with them.
    kernels = sorted(glob.glob("csrc/cuda/*.cu")) if _nvcc_found() else []
    cuda_sources = kernels + sorted(glob.glob("csrc/cuda/*.cpp")) if kernels else []
    if not cuda_sources:
        return CppExtension("nbp_mega._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cxx += ["-DNBP_WITH_CUDA", f'-DNBP_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-DNBP_WITH_CUDA", "--expt-relaxed-constexpr"]
    return CUDAExtension("nbp_mega._C", cpu_sources + cuda_sources,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)


class BuildKernels(BuildExtension):
    """BuildExtension, except that an optional extension that fails to build only warns."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # ninja and the compilers fail with several types
            if not getattr(ext, "optional", False):
                raise
            self.warn(f"{ext.name} was NOT built ({error}); nbp_mega.ops will use its "
                      "pure-PyTorch attention. Set NBP_REQUIRE_EXTENSION=1 to make this fatal.")


setup(
    name="nbp_mega",
    version="0.1.0",
    description="Next-Block-Prediction video generation: Megatron-core TP + DeepSpeed ZeRO",
    packages=find_packages(include=["nbp_mega", "nbp_mega.*"]),
    ext_modules=[_kernels_extension()],
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
