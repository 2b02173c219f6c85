"""`nestify`: give an existing PyTorch model a TA without rewriting it (the drop-in use).

The chosen `nn.Linear` layers, or Hugging Face `Conv1D` layers (GPT-2's projections, a
linear map whose weight is stored (in, out)), by name pattern, become nested Dense layers
whose Student block holds the original weights (`NestedLinear.from_linear`; a Conv1D's
weight is transposed on the way in and out). Both models then run in one
pass of the unchanged forward code: the wrapper stacks two copies of the input along the
batch dimension, the first half carrying the Student stream and the second the TA stream.
A nested layer splits the halves, runs the nested op and stacks the outputs again, the
Student's outputs zero-padded to the TA's width; every other layer sees one batch of
twice the size (one GEMM for both streams).

This is exact when every operation between nested layers treats batch items
independently and does not mix features across a widened dimension (elementwise
activations, dropout, residual adds and LayerNorms over unwidened features, attention
over tokens are fine; BatchNorm in training mode, or a LayerNorm over a widened hidden
dimension, are not). Widen hidden dimensions: the TA of a widened final output layer has
extra outputs, and the Student's copy of them is zero. The stacked batch changes the row
count of every GEMM, and CPU BLAS rounds differently for different row counts, so the
Student matches the original to rounding (about 1e-7 relative in fp32), not bit for bit;
`matta.nest_hf` runs each stream at the original shapes and is exact.
"""
import copy
import fnmatch
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from .layers import NestedLinear
from .layers.nested_linear import plain_linear


def is_conv1d(module) -> bool:
    """Whether `module` is a Hugging Face `Conv1D` (recognised by its name and layout, so that
    matta needs no `transformers` import): y = x @ weight + bias with weight (in, out)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2


def as_linear(module) -> nn.Linear:
    """`module` itself if it is an nn.Linear; a Conv1D as an nn.Linear (weight transposed, a copy)."""
    if isinstance(module, nn.Linear):
        return module
    if is_conv1d(module):
        return plain_linear(module.weight.t(), module.bias)
    raise TypeError(f"expected an nn.Linear or a Hugging Face Conv1D, got {type(module).__name__}")


def projection_features(module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]


def nest_projection(module, in_features, out_features, *, share_weights=True, cls=NestedLinear):
    """`cls.from_linear` of an nn.Linear or Conv1D: its weights become the Student block. The
    result remembers the original class (`plain_type`), which `plain_projection` gives back."""
    nested = cls.from_linear(as_linear(module), in_features, out_features, share_weights=share_weights)
    nested.plain_type = type(module)
    return nested


def plain_projection(plain_type, weight, bias) -> nn.Module:
    """A standalone layer of `plain_type` (nn.Linear or a Conv1D class) holding copies of
    `weight` (out, in) and `bias`."""
    if plain_type.__name__ != "Conv1D":
        return plain_linear(weight, bias)
    layer = plain_type(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.t())
        layer.bias.copy_(bias)
    return layer


class StackedNestedLinear(NestedLinear):
    """A NestedLinear reading and writing both streams stacked along `batch_dim`."""

    def __init__(self, *args, batch_dim=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_dim = batch_dim

    def forward(self, x):
        bd = self.batch_dim
        half = x.shape[bd] // 2
        (m_s, m_ta), (n_s, n_ta) = self.in_features, self.out_features
        if x.shape[-1] != m_ta or 2 * half != x.shape[bd]:
            raise ValueError(
                f"a nestified layer expects both streams stacked along dim {bd} with width {m_ta}, "
                f"got shape {tuple(x.shape)}: call the Nestified wrapper, not the inner module"
            )
        x_s, x_ta = x.narrow(bd, 0, half)[..., :m_s], x.narrow(bd, half, half)
        y_s, y_ta = super().forward(x_s, x_ta)
        return torch.cat([F.pad(y_s, (0, n_ta - n_s)), y_ta], dim=bd)


class Nestified(nn.Module):
    """The result of `nestify`: `y_s, y_ta = nestified(*inputs)`; `student()` / `ta()`
    give standalone copies of the original model with ordinary nn.Linear layers."""

    def __init__(self, module: nn.Module, nested_names: tuple[str, ...], batch_dim: int):
        super().__init__()
        self.module, self.nested_names, self.batch_dim = module, nested_names, batch_dim

    def forward(self, *args, **kwargs):
        bd = self.batch_dim

        def stack(value):
            return torch.cat([value, value], dim=bd) if isinstance(value, torch.Tensor) else value

        out = self.module(*tree_map(stack, args), **tree_map(stack, kwargs))

        def half(index):
            def take(value):
                if not isinstance(value, torch.Tensor):
                    return value
                n = value.shape[bd] // 2
                return value.narrow(bd, index * n, n)

            return take

        return tree_map(half(0), out), tree_map(half(1), out)

    def _plain(self, which):
        plain = copy.deepcopy(self.module)
        for name in self.nested_names:
            layer = plain.get_submodule(name)
            weight, bias = layer.student_parameters() if which == "student" else (layer.weight, layer.bias)
            _set_submodule(plain, name, plain_projection(layer.plain_type, weight, bias))
        return plain

    def student(self) -> nn.Module:
        """A standalone copy of the original model holding the Student's weights (each nested
        layer back as the nn.Linear or Conv1D it was)."""
        return self._plain("student")

    def ta(self) -> nn.Module:
        """A standalone copy of the original model widened to the TA, holding its weights."""
        return self._plain("ta")


def _set_submodule(root, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def nestify(module: nn.Module, widths: Mapping[str, tuple], *, batch_dim: int = 0, share_weights: bool = True) -> Nestified:
    """M-nest the nn.Linear (or Hugging Face Conv1D) layers of `module` whose names match the
    given patterns.

    Args:
        module: any nn.Module; it is copied, not changed.
        widths: {fnmatch pattern of a submodule name: (in_features_ta, out_features_ta)},
            None keeping that side's size. E.g. for transformer FFNs
            {"*.fc1": (None, 2048), "*.fc2": (2048, None)}.
        batch_dim: the batch dimension of every tensor input and output.
        share_weights: False gives the Student its own weights (the paper's ablation).
    Returns:
        a `Nestified` module: `y_s, y_ta = nestified(*inputs)`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"nestify needs an nn.Module, got {type(module).__name__}")
    if not widths:
        raise ValueError("nestify needs at least one {pattern: (in_features_ta, out_features_ta)} entry")
    module = copy.deepcopy(module)
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    chosen = {}
    for pattern, sizes in widths.items():
        try:
            in_ta, out_ta = sizes
        except (TypeError, ValueError):
            raise TypeError(f"widths[{pattern!r}] must be a pair (in_features_ta, out_features_ta), got {sizes!r}") from None
        matches = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(f"pattern {pattern!r} matches no nn.Linear or Conv1D; the model's have {sorted(linears)}")
        for name in matches:
            if name in chosen:
                raise ValueError(f"layer {name!r} is matched by two patterns ({chosen[name][0]!r} and {pattern!r})")
            chosen[name] = (pattern, in_ta, out_ta)
    for name, (_, in_ta, out_ta) in chosen.items():
        layer = linears[name]
        n_s, m_s = projection_features(layer)
        nested = nest_projection(layer, (m_s, m_s if in_ta is None else in_ta), (n_s, n_s if out_ta is None else out_ta),
                                 share_weights=share_weights, cls=StackedNestedLinear)
        nested.batch_dim = batch_dim
        _set_submodule(module, name, nested)
    return Nestified(module, tuple(chosen), batch_dim)
