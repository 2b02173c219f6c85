"""How many times each Triton kernel has launched in this process.

Tests that claim kernel coverage read it, so a case that silently took the PyTorch path
(float64, no grad, a dispatcher choice) cannot pass as a test of the kernel.
"""
from collections import Counter

LAUNCH_COUNTS: Counter = Counter()


def count_launch(kernel_name: str) -> None:
    LAUNCH_COUNTS[kernel_name] += 1
