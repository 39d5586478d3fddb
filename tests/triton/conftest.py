"""Run the shared Triton kernels on the CPU through Triton's interpreter, unless a device
is named (PORTASERVE_TEST_DEVICE=cuda on a GPU host runs them compiled).  The variable
must be set before the kernels are decorated (imported)."""
import os

if os.environ.get("PORTASERVE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
