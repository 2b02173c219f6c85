"""Property test: the MatTA loss on random shapes against the float64 oracle (hypothesis)."""
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_matta_loss import check_against_oracle, random_case  # noqa: E402

from matta.ops.matta_loss import matta_loss  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), n_classes=st.integers(2, 70), soft=st.booleans(),
       tau=st.floats(0.3, 4.0), ramp=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_torch_path(rows, n_classes, soft, tau, ramp, seed):
    torch.manual_seed(seed)
    z_s, z_ta, target, weights = random_case((rows,), n_classes, soft, "cpu", dtype=torch.float64, n_ignored=1)
    check_against_oracle(matta_loss, z_s, z_ta, target, weights, ramp=ramp, tau=tau, floor=1e-10)
