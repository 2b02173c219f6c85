"""Autograd-aware ops with their plain-PyTorch references, and backend dispatch."""
from .nested_linear import nested_linear, nested_linear_reference

__all__ = ["nested_linear", "nested_linear_reference"]
