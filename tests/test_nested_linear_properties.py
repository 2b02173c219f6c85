"""Property test: the Triton nested Dense kernels on random small shapes (hypothesis)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_nested_linear import assert_matches_oracle, make_problem  # noqa: E402


@pytest.fixture
def triton_device(monkeypatch, device):
    """The device, with MATTA_BACKEND=triton for the whole test (same for every example)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    return device


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    t=st.integers(1, 40), m_s=st.integers(1, 40), extra_m=st.integers(0, 30),
    n_s=st.integers(1, 40), extra_n=st.integers(0, 30), one_input=st.booleans(), shared=st.booleans(),
)
def test_random_shapes_triton(triton_device, t, m_s, extra_m, n_s, extra_n, one_input, shared):
    problem, sf = make_problem((t, m_s, m_s + extra_m, n_s, n_s + extra_n), one_input=one_input, shared=shared,
                               bias=True, dtype=torch.float32, device=triton_device)
    assert_matches_oracle(problem, sf, torch.float32, kernel=True)
