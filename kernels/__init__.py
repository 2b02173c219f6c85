"""Triton kernels of matta, installed as `matta.kernels` (never as a top-level `kernels`).

Each module holds one op's kernels and their launchers. Launchers take and return torch
tensors and check nothing: argument checking happens once, in `matta.ops`.
Every kernel configuration that can be launched is listed with `register_compile_spec`, so
CI can compile each one for Hopper and Ampere without a GPU (tests/test_kernel_compile.py);
a module whose launchers choose among many flag combinations also lists what they launch
(`enumerate_launches`, as `Launch`es), and compile_check fails on a launch no spec covers.
Every launcher calls `count_launch(name)`, so tests can check that a kernel really ran.
"""
from ._compile_specs import COMPILE_SPECS, CompileSpec, Launch, record_launch, register_compile_spec
from ._launches import LAUNCH_COUNTS, count_launch

__all__ = ["COMPILE_SPECS", "CompileSpec", "LAUNCH_COUNTS", "Launch", "count_launch", "record_launch",
           "register_compile_spec"]
