"""@triton.jit kernels and their launch helpers only (no autograd glue, no argument checking)."""
