"""Optimizers: Shampoo with blocked Kronecker factors and batched inverse roots."""
from .shampoo import GRAFTINGS, RootSettings, Shampoo, block_bounds, matrix_view_shape, nested_block_splits

__all__ = ["GRAFTINGS", "RootSettings", "Shampoo", "block_bounds", "matrix_view_shape", "nested_block_splits"]
