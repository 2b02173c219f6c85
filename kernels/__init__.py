"""Triton kernels of matta, installed as `matta.kernels` (never as a top-level `kernels`).

Each module holds one op's kernels and their launchers. Launchers take and return torch
tensors and check nothing: argument checking happens once, in `matta.ops`.
Every kernel configuration that can be launched is listed with `register_compile_spec`, so
CI can compile each one for Hopper and Ampere without a GPU (tests/test_kernel_compile.py).
"""
from ._compile_specs import COMPILE_SPECS, CompileSpec, register_compile_spec

__all__ = ["COMPILE_SPECS", "CompileSpec", "register_compile_spec"]
