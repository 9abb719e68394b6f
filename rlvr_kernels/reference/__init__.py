"""Plain-torch implementations: the CPU path of every op and the oracle its Triton kernel is tested against."""
