"""`NestedLayerNorm`: a LayerNorm whose Student is the leading block of the TA's."""
import torch
import torch.nn.functional as F
from torch import nn

from .._sizes import as_size
from ..ops.layer_norm import layer_norm


class NestedLayerNorm(nn.Module):
    """LayerNorm of both streams: the Student normalises its first d_S features with the
    first d_S entries of the TA's scale and shift (d_model nesting; d_S == d_TA without it)."""

    def __init__(self, d_s: int, d_ta: int, eps: float):
        super().__init__()
        d_s, d_ta = as_size("NestedLayerNorm d_s", d_s), as_size("NestedLayerNorm d_ta", d_ta)
        if d_s > d_ta:
            raise ValueError(f"NestedLayerNorm needs 0 < d_s <= d_ta, got d_s={d_s}, d_ta={d_ta}")
        self.d_s, self.eps = d_s, eps
        self.weight = nn.Parameter(torch.ones(d_ta))
        self.bias = nn.Parameter(torch.zeros(d_ta))

    def student_parameters(self):
        """(scale, shift) of the Student: the first d_S entries; the whole vectors when d_S = d_TA
        (no slice: a slice's backward is a zero fill and a copy per vector, for the same sums)."""
        if self.d_s == self.weight.shape[0]:
            return self.weight, self.bias
        return self.weight[: self.d_s], self.bias[: self.d_s]

    def forward_student(self, x_s):
        return F.layer_norm(x_s, (self.d_s,), *self.student_parameters(), self.eps)

    def forward_ta(self, x_ta):
        return F.layer_norm(x_ta, (x_ta.shape[-1],), self.weight, self.bias, self.eps)

    def forward(self, x_s, x_ta):
        return self.forward_student(x_s), self.forward_ta(x_ta)

    def norm_student(self, x_s, residual_s=None):
        """The Student's norm as one fused op (matta.ops.layer_norm): y_s, or (x_s + residual_s,
        y_s) with a residual; y_s in the autocast dtype under autocast, ready for the next
        nested Dense op. In fp32 the same numbers as the add and forward_student."""
        return layer_norm(x_s, *self.student_parameters(), self.eps, residual=residual_s)

    def norm_ta(self, x_ta, residual_ta=None):
        """The TA's norm as one fused op, as `norm_student`."""
        return layer_norm(x_ta, self.weight, self.bias, self.eps, residual=residual_ta)

    def plain(self, width: int) -> nn.LayerNorm:
        """An nn.LayerNorm over the first `width` features, holding a copy of them."""
        ln = nn.LayerNorm(width, eps=self.eps, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            ln.weight.copy_(self.weight[:width])
            ln.bias.copy_(self.bias[:width])
        return ln

    def extra_repr(self):
        return f"d_s={self.d_s}, d_ta={self.weight.shape[0]}, eps={self.eps}"
