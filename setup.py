"""Package list for setuptools (everything else is in pyproject.toml): the ``rlvr_kernels`` packages, plus the C++
sources of ``csrc/`` shipped inside the wheel as ``rlvr_kernels/_csrc`` (a checkout builds them from ``csrc/``
directly). The sources are compiled on first use, not here: see ``rlvr_kernels/_native.py``."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["rlvr_kernels*"]), "rlvr_kernels._csrc"],
    package_dir={"rlvr_kernels._csrc": "csrc"},
)
