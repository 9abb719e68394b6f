"""Low-level ops of the torch backend whose CPU implementation is native C++ (``csrc/<module>.cpp``, built on first
use by :mod:`rlvr_kernels._native`) and whose implementation elsewhere, and the fallback where no compiler is found,
is the plain-torch reference. One module per C++ source file, named alike."""
