"""`NestedLinear`: a Dense layer whose Student is a block of the TA's weight."""
import math

import torch
from torch import nn

from .._sizes import as_size_pair
from ..ops.nested_linear import linear, nested_linear


def _size_pair(name, value):
    small, large = as_size_pair(name, value, "(Student, TA)")
    if small <= 0 or large <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if small > large:
        raise ValueError(f"{name}: the Student size ({small}) must not exceed the TA size ({large})")
    return small, large


def plain_linear(weight, bias=None) -> nn.Linear:
    """An `nn.Linear` holding contiguous copies of `weight` (out, in) and `bias` (views allowed)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _uniform_(tensor, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class NestedLinear(nn.Module):
    """Student and TA Dense layers over one weight (paper Algorithm 2, Figure 2).

    `weight` is (N_TA, M_TA); the Student uses `weight[:N_S, :M_S]` and `bias[:N_S]`, so
    the Student is structurally a block of the TA and an optimizer sees one matrix.

    Call with two inputs, `layer(x_s, x_ta)` with x_s (..., M_S) and x_ta (..., M_TA), or
    with one, `layer(x)` with x (..., M_TA) of which the Student reads the first M_S
    features. Returns `(y_s, y_ta)` of widths N_S and N_TA.

    Initialisation: every row is drawn like `nn.Linear`'s weight (uniform, bound
    1/sqrt(fan_in)), with fan_in M_S for the Student block and M_TA elsewhere, so the
    Student alone starts exactly as a fresh `nn.Linear(M_S, N_S)` would. `from_linear`
    instead copies a trained layer into the Student block and zeroes the TA's extra
    input columns of the Student rows: the TA then starts by computing the Student's
    features plus new units, and training starts from the Student's quality.

    `share_weights=False` gives the Student its own `student_weight` / `student_bias`
    (the paper's Table 4 ablation); nothing then ties the two models.
    """

    def __init__(self, in_features, out_features, bias=True, share_weights=True, device=None, dtype=None):
        super().__init__()
        self.in_features = _size_pair("in_features", in_features)
        self.out_features = _size_pair("out_features", out_features)
        if not isinstance(share_weights, bool):
            raise TypeError(f"share_weights must be True or False, got {share_weights!r}")
        self.share_weights = share_weights
        (m_s, m_ta), (n_s, n_ta) = self.in_features, self.out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(n_ta, m_ta, **factory))
        self.bias = nn.Parameter(torch.empty(n_ta, **factory)) if bias else None
        if self.share_weights:
            self.register_parameter("student_weight", None)
            self.register_parameter("student_bias", None)
        else:
            self.student_weight = nn.Parameter(torch.empty(n_s, m_s, **factory))
            self.student_bias = nn.Parameter(torch.empty(n_s, **factory)) if bias else None
        self.reset_parameters()

    @property
    def student_features(self):
        """(N_S, M_S): output and input size of the Student."""
        return self.out_features[0], self.in_features[0]

    def reset_parameters(self):
        (m_s, m_ta), (n_s, _) = self.in_features, self.out_features
        _uniform_(self.weight, m_ta)
        if self.bias is not None:
            _uniform_(self.bias, m_ta)
        student_w = self.weight[:n_s, :m_s] if self.share_weights else self.student_weight
        student_b = self.bias[:n_s] if self.share_weights and self.bias is not None else self.student_bias
        _uniform_(student_w, m_s)
        if student_b is not None:
            _uniform_(student_b, m_s)

    def nested_parameters(self) -> dict:
        """The parameter arguments of `matta.ops.nested_linear` (and of each layer of
        `nested_gelu_mlp`) for this layer."""
        return dict(weight=self.weight, bias=self.bias, student_features=self.student_features,
                    student_weight=self.student_weight, student_bias=self.student_bias)

    def forward(self, x_s, x_ta=None):
        return nested_linear(x_s, x_ta, **self.nested_parameters())

    def student_parameters(self):
        """(weight, bias) of the Student: views of the TA's leading block, or its own when unshared.
        Where the block is the whole weight (Student and TA of one shape), the weight itself: a
        slice's backward would add a zero fill and a copy of the whole gradient."""
        if not self.share_weights:
            return self.student_weight, self.student_bias
        n_s, m_s = self.student_features
        if (n_s, m_s) == tuple(self.weight.shape):
            return self.weight, self.bias
        return self.weight[:n_s, :m_s], None if self.bias is None else self.bias[:n_s]

    def forward_student(self, x_s):
        """The Student alone, x_s (..., M_S) -> (..., N_S): for runs that train only the Student
        (`matta.ops.linear`: the nested kernels where they run, else F.linear)."""
        return linear(x_s, *self.student_parameters())

    def forward_ta(self, x_ta):
        """The TA alone, x_ta (..., M_TA) -> (..., N_TA) (`matta.ops.linear`)."""
        return linear(x_ta, self.weight, self.bias)

    def student_linear(self) -> nn.Linear:
        """A standalone `nn.Linear(M_S, N_S)` holding a copy of the Student's parameters."""
        return plain_linear(*self.student_parameters())

    def ta_linear(self) -> nn.Linear:
        """A standalone `nn.Linear(M_TA, N_TA)` holding a copy of the TA's parameters."""
        return plain_linear(self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_features, out_features, share_weights=True):
        """Nestify a trained `nn.Linear`: it becomes the Student block, copied exactly."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        (m_s, _), (n_s, _) = _size_pair("in_features", in_features), _size_pair("out_features", out_features)
        if (linear.out_features, linear.in_features) != (n_s, m_s):
            raise ValueError(
                f"the linear layer maps {linear.in_features} -> {linear.out_features} features, but the "
                f"Student of in_features={tuple(in_features)}, out_features={tuple(out_features)} "
                f"maps {m_s} -> {n_s}"
            )
        layer = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            share_weights=share_weights,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            # The TA starts as the Student plus new units (for an unshared Student too).
            layer.weight[:n_s, m_s:].zero_()
            layer.weight[:n_s, :m_s].copy_(linear.weight)
            if linear.bias is not None:
                layer.bias[:n_s].copy_(linear.bias)
            if not share_weights:
                layer.student_weight.copy_(linear.weight)
                if linear.bias is not None:
                    layer.student_bias.copy_(linear.bias)
        return layer

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, share_weights={self.share_weights}"
        )
