"""nbp_mega: semi-autoregressive Next-Block-Prediction video generation at scale.

`pip install -e .` (or `make install`). The fused attention extension nbp_mega._C (csrc/)
is added here by the kernels issue; until then the package is pure Python.
"""

from setuptools import find_packages, setup

setup(
    name="nbp_mega",
    version="0.1.0",
    description="Next-Block-Prediction video generation: Megatron-core TP + DeepSpeed ZeRO",
    packages=find_packages(include=["nbp_mega", "nbp_mega.*"]),
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
