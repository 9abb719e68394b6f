"""``python -m rlvr_kernels.bench`` and the ``rlvr-bench`` console script: see :mod:`rlvr_kernels.bench.cli`."""

import sys

from rlvr_kernels.bench.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
