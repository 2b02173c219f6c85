"""nn.Module wrappers around matta's ops: the nested Dense layer and the nested LayerNorm."""
from .nested_layer_norm import NestedLayerNorm
from .nested_linear import NestedLinear

__all__ = ["NestedLayerNorm", "NestedLinear"]
