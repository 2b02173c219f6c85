"""`nestify`: give an existing PyTorch model a TA without rewriting it (the drop-in use).

The chosen `nn.Linear` layers (by name pattern) become nested Dense layers whose Student
block holds the original weights (`NestedLinear.from_linear`). Both models then run in one
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
extra outputs, and the Student's copy of them is zero.
"""
import copy
import fnmatch
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from .layers import NestedLinear


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
            linear = layer.student_linear() if which == "student" else layer.ta_linear()
            _set_submodule(plain, name, linear)
        return plain

    def student(self) -> nn.Module:
        """A standalone copy of the original model holding the Student's weights."""
        return self._plain("student")

    def ta(self) -> nn.Module:
        """A standalone copy of the original model widened to the TA, holding its weights."""
        return self._plain("ta")


def _set_submodule(root, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def nestify(module: nn.Module, widths: Mapping[str, tuple], *, batch_dim: int = 0, share_weights: bool = True) -> Nestified:
    """M-nest the nn.Linear layers of `module` whose names match the given patterns.

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
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    chosen = {}
    for pattern, sizes in widths.items():
        try:
            in_ta, out_ta = sizes
        except (TypeError, ValueError):
            raise TypeError(f"widths[{pattern!r}] must be a pair (in_features_ta, out_features_ta), got {sizes!r}") from None
        matches = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(f"pattern {pattern!r} matches no nn.Linear; the model's Linear layers are {sorted(linears)}")
        for name in matches:
            if name in chosen:
                raise ValueError(f"nn.Linear {name!r} is matched by two patterns ({chosen[name][0]!r} and {pattern!r})")
            chosen[name] = (pattern, in_ta, out_ta)
    for name, (_, in_ta, out_ta) in chosen.items():
        linear = linears[name]
        m_s, n_s = linear.in_features, linear.out_features
        nested = StackedNestedLinear.from_linear(
            linear, (m_s, m_s if in_ta is None else in_ta), (n_s, n_s if out_ta is None else out_ta), share_weights=share_weights
        )
        nested.batch_dim = batch_dim
        _set_submodule(module, name, nested)
    return Nestified(module, tuple(chosen), batch_dim)
