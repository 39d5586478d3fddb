"""Triton kernels shared by the CUDA, ROCm and XPU platforms (Triton has backends for all
three).  Each kernel implements one op of core/ops with the native op's contract; the
platform packages register them in platforms/providers.py.  Under TRITON_INTERPRET=1 the
same kernels run on the CPU, which is how CI checks them without a GPU."""
