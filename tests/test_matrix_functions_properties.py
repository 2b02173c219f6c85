"""Property test: batched Newton inverse roots on random SPD batches (hypothesis)."""
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_matrix_functions import fp32_floor, random_spd, rel_error, torch_fp32_root  # noqa: E402

from matta.ops.matrix_functions import matrix_inverse_root, matrix_inverse_root_reference  # noqa: E402


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 24), batch=st.integers(1, 4), log_condition=st.floats(0, 5), root=st.sampled_from([2, 4]))
def test_newton_property(n, batch, log_condition, root):
    a = random_spd(batch, n, 10**log_condition, "cpu")
    x, diag = matrix_inverse_root(a, root=root, epsilon=0.0, method="newton", return_diagnostics=True)
    ref = matrix_inverse_root_reference(a, root=root)
    torch_fp32 = rel_error(torch_fp32_root(a, root, 0.0), ref)
    assert rel_error(x, ref) <= 2 * torch_fp32 + fp32_floor(10**log_condition)
    assert (diag.error < 1e-3).all()
