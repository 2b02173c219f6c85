"""The nested-linear kernel's plain products (SUB_MODE NONE, compiled without the Student
phase): the backward paths where only one stream's input, or only one of an unshared layer's
weights, needs a gradient. Against a float64 oracle, on odd sizes across several 32-wide
interpreter tiles, with the launch checked."""
import pytest
import torch

from matta import nested_linear
from matta.ops.nested_linear import nested_linear_reference

T, M_S, M_TA, N_S, N_TA = 37, 19, 45, 23, 51
WANTS = ["x_ta", "x_s", "weight", "student_weight"]  # the one input that needs a gradient


def backward(outputs, grads):
    """Backward through the outputs that depend on the input that needs a gradient."""
    pairs = [(y, g) for y, g in zip(outputs, grads) if y.requires_grad]
    torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])


@pytest.mark.parametrize("wants", WANTS)
def test_one_gradient_alone(device, check_launches, monkeypatch, wants):
    monkeypatch.setenv("MATTA_BACKEND", "triton")
    shared = wants in ("x_ta", "x_s")
    inputs = {
        "x_s": torch.randn(T, M_S, device=device), "x_ta": torch.randn(T, M_TA, device=device),
        "weight": torch.randn(N_TA, M_TA, device=device), "bias": torch.randn(N_TA, device=device),
        "student_weight": None if shared else torch.randn(N_S, M_S, device=device),
    }
    inputs[wants].requires_grad_()
    g_s, g_ta = torch.randn(T, N_S, device=device), torch.randn(T, N_TA, device=device)
    with check_launches(True, "nested_linear.matmul"):
        y_s, y_ta = nested_linear(**inputs, student_features=(N_S, M_S))
        backward((y_s, y_ta), (g_s, g_ta))
    oracle = {k: None if v is None else v.detach().double().requires_grad_(k == wants) for k, v in inputs.items()}
    r_s, r_ta = nested_linear_reference(oracle["x_s"], oracle["x_ta"], oracle["weight"], oracle["bias"],
                                        student_features=(N_S, M_S), student_weight=oracle["student_weight"])
    backward((r_s, r_ta), (g_s.double(), g_ta.double()))
    grad, expected = inputs[wants].grad.double(), oracle[wants].grad
    assert torch.isfinite(grad).all()
    assert ((grad - expected).norm() / expected.norm()).item() < 1e-5, wants
    assert all(v.grad is None for k, v in inputs.items() if k != wants and v is not None)
