"""Optimizers: Shampoo with blocked Kronecker factors, batched per block shape, and batched inverse roots."""
from .shampoo import (FACTOR_MATMUL_DTYPES, GRAFTINGS, RootSettings, Shampoo, block_bounds, matrix_view_shape,
                      nested_block_splits)

__all__ = ["FACTOR_MATMUL_DTYPES", "GRAFTINGS", "RootSettings", "Shampoo", "block_bounds", "matrix_view_shape",
           "nested_block_splits"]
