"""Run the shared Triton kernels on the CPU through Triton's interpreter.  The variable
must be set before the kernels are decorated (imported)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
