"""matta: Matryoshka Teaching-Assistant training with fused kernels.

A Student model nested inside a Teaching Assistant that shares its weights, both trained at
once with online distillation (paper: "Matryoshka Model Learning for Improved Elastic
Student Models", KDD 2025).
"""
from ._source_tree import ensure_kernels_subpackage

ensure_kernels_subpackage()

from .layers import NestedLinear  # noqa: E402
from .ops import nested_linear, nested_linear_reference  # noqa: E402

__version__ = "0.1.0"

__all__ = ["NestedLinear", "nested_linear", "nested_linear_reference"]
