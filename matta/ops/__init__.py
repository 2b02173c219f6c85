"""Autograd-aware ops with their plain-PyTorch references, backend dispatch and matrix functions."""
from .deferred import DeferredReport
from .fused_linear_matta_loss import fused_linear_matta_loss
from .matta_loss import MatTALossOutput, matta_loss, matta_loss_reference
from .matrix_functions import RootDiagnostics, matrix_inverse_root, matrix_inverse_root_reference
from .nested_linear import (gelu_mlp, linear, nested_gelu_mlp, nested_gelu_mlp_reference, nested_linear,
                            nested_linear_reference)

__all__ = [
    "DeferredReport",
    "nested_linear", "nested_linear_reference", "nested_gelu_mlp", "nested_gelu_mlp_reference",
    "gelu_mlp", "linear",
    "matrix_inverse_root", "matrix_inverse_root_reference", "RootDiagnostics",
    "MatTALossOutput", "fused_linear_matta_loss", "matta_loss", "matta_loss_reference",
]
