"""The ops of the memory-efficient dense block, one module per op (see csrc/ for their kernels)."""
