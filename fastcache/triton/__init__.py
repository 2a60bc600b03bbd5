"""Triton kernels, one module per op family (imported lazily: set TRITON_INTERPRET=1 before the first use to run
them on CPU tensors through the Triton interpreter)."""
