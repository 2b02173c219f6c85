"""pytest-benchmark timings of one nested Dense forward+backward (CPU-sized; CUDA if present).

    python -m pytest benchmarks/test_nested_linear_benchmark.py --benchmark-enable

Compares the naive module (slice the weight, two F.linear, autograd) with matta's
dispatching op on a GPT-2-FFN-shaped problem scaled down to run in seconds on a CPU.
benchmarks/bench_nested_linear.py times the full-size shapes and prints ratios.
"""
import pytest
import torch
import torch.nn.functional as F

from matta import nested_linear

T, M_S, M_TA, N_S, N_TA = 512, 256, 256, 1024, 2048


@pytest.fixture(scope="module")
def problem():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(0.05).requires_grad_()
    return {
        "x_s": rand(T, M_S), "x_ta": rand(T, M_TA), "weight": rand(N_TA, M_TA), "bias": rand(N_TA),
        "g_s": torch.randn(T, N_S, device=device, dtype=dtype), "g_ta": torch.randn(T, N_TA, device=device, dtype=dtype),
    }


def _step(outputs, p):
    torch.autograd.backward(outputs, (p["g_s"], p["g_ta"]))
    if p["weight"].is_cuda:
        torch.cuda.synchronize()


def test_naive_module(benchmark, problem):
    p = problem
    benchmark(lambda: _step((F.linear(p["x_s"], p["weight"][:N_S, :M_S], p["bias"][:N_S]),
                             F.linear(p["x_ta"], p["weight"], p["bias"])), p))


def test_matta_nested_linear(benchmark, problem):
    p = problem
    benchmark(lambda: _step(nested_linear(p["x_s"], p["x_ta"], p["weight"], p["bias"],
                                          student_features=(N_S, M_S)), p))
