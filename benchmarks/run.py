"""Kept for existing commands: ``python benchmarks/run.py [options]`` runs ``rlvr-bench [options]`` (the package's
:mod:`rlvr_kernels.bench`; see ``--help``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's rlvr_kernels

from rlvr_kernels.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/run.py"))
