"""Kept for existing commands: ``python benchmarks/update_readme.py [RESULTS_DIR ...] [--readme README.md] [--check]``
regenerates the README's results block (:mod:`rlvr_kernels.bench.readme_table`; default: the newest folder per
device under benchmarks/results/)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's rlvr_kernels

from rlvr_kernels.bench.readme_table import END, START, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/update_readme.py"))
