"""nn.Module wrappers around matta's ops."""
from .nested_linear import NestedLinear

__all__ = ["NestedLinear"]
