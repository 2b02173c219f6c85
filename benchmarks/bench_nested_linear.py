"""Forward+backward time of a nested Dense layer: naive module vs matta, against a GEMM ceiling.

    python benchmarks/bench_nested_linear.py                 # CPU, fp32, small T
    python benchmarks/bench_nested_linear.py --gpu --json out.json   # CUDA, bf16, T up to 16384
    python benchmarks/bench_nested_linear.py --gpu --dtypes tf32 fp32 --tokens 1024 16384

`--dtypes` takes the dispatch table's keys: bf16, fp16, tf32 (fp32 with TF32 allowed) and
fp32 (TF32 off). The JSON it writes is what benchmarks/write_dispatch_table.py reads.

Variants, timed in the same run on the same inputs:
- naive: what users write today: slice the weight, two F.linear calls, autograd.
- torch: matta's PyTorch path (MATTA_BACKEND=torch).
- triton: matta's fused Triton kernels (CUDA only).
- ceiling: one plain linear layer (forward + both gradients) with the same FLOPs, the
  practical upper bound for any implementation.
Shapes are the GPT-2 Medium MatTA FFN (d 1024, Student FFN 4096, TA FFN 8192): the up
projection (two 1024-wide streams -> 4096/8192), the down projection (4096/8192 -> 1024),
and the first-layer form with one shared input.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta.ops.nested_linear import nested_linear  # noqa: E402
from partial_results import PartialResults  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}

# name -> (M_S, M_TA, N_S, N_TA, one_input)
SHAPES = {
    "ffn_up": (1024, 1024, 4096, 8192, False),
    "ffn_down": (4096, 8192, 1024, 1024, False),
    "ffn_up_one_input": (1024, 1024, 4096, 8192, True),
}


def flops(t, m_s, m_ta, n_s, n_ta, one_input):
    """Useful FLOPs of forward + backward (three GEMMs per stream)."""
    if one_input and m_s == m_ta:
        return 3 * 2 * t * m_ta * n_ta + 2 * 2 * t * m_s * n_s  # y_s is free in the forward
    return 3 * 2 * t * (m_s * n_s + m_ta * n_ta)


def naive(x_s, x_ta, weight, bias, n_s, m_s):
    if x_ta is None:
        x_ta, x_s = x_s, x_s[..., :m_s]
    return F.linear(x_s, weight[:n_s, :m_s], bias[:n_s]), F.linear(x_ta, weight, bias)


def matta(backend):
    def run(x_s, x_ta, weight, bias, n_s, m_s):
        os.environ["MATTA_BACKEND"] = backend
        return nested_linear(x_s, x_ta, weight, bias, student_features=(n_s, m_s))
    return run


def _elapsed_ms(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_interleaved_ms(fns, device, repeats, warmup):
    """Median ms of each function; the functions take turns, so drifting load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_elapsed_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(name, t, dtype_key, device, repeats, warmup, variants):
    m_s, m_ta, n_s, n_ta, one_input = SHAPES[name]
    dtype = DTYPES[dtype_key]
    torch.backends.cuda.matmul.allow_tf32 = dtype_key == "tf32"
    weight = torch.randn(n_ta, m_ta, device=device, dtype=dtype).mul_(0.02).requires_grad_()
    bias = torch.zeros(n_ta, device=device, dtype=dtype, requires_grad=True)
    x_ta = torch.randn(t, m_ta, device=device, dtype=dtype, requires_grad=True)
    x_s = None if one_input else torch.randn(t, m_s, device=device, dtype=dtype, requires_grad=True)
    if one_input:
        x_s, x_ta = x_ta, None
    g_s = torch.randn(t, n_s, device=device, dtype=dtype)
    g_ta = torch.randn(t, n_ta, device=device, dtype=dtype)
    total = flops(t, m_s, m_ta, n_s, n_ta, one_input)

    # Ceiling: one linear layer with the same FLOPs (inputs M_TA wide, outputs scaled to match).
    n_eq = max(1, round(total / (6 * t * m_ta)))
    w_eq = torch.randn(n_eq, m_ta, device=device, dtype=dtype, requires_grad=True)
    x_eq = torch.randn(t, m_ta, device=device, dtype=dtype, requires_grad=True)
    g_eq = torch.randn(t, n_eq, device=device, dtype=dtype)

    def ceiling():
        torch.autograd.backward(F.linear(x_eq, w_eq), g_eq)

    fns = {"ceiling": ceiling}
    impls = {"naive": naive, "torch": matta("torch"), "triton": matta("triton")}
    for variant in variants:
        impl = impls[variant]

        def step(impl=impl):
            y_s, y_ta = impl(x_s, x_ta, weight, bias, n_s, m_s)
            torch.autograd.backward((y_s, y_ta), (g_s, g_ta))
        fns[variant] = step

    medians = time_interleaved_ms(fns, device, repeats, warmup)
    rows = []
    for variant, ms in medians.items():
        rows.append({"shape": name, "T": t, "dtype": str(dtype).replace("torch.", ""), "dtype_key": dtype_key,
                     "variant": variant, "median_ms": ms, "tflops": total / ms / 1e9})
    if device.type == "cuda":
        for variant, fn in fns.items():  # peak memory of one step of each, measured alone
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            next(r for r in rows if r["variant"] == variant)["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    base = {r["variant"]: r["median_ms"] for r in rows}
    for r in rows:
        r["speedup_vs_naive"] = base["naive"] / r["median_ms"]
        r["fraction_of_ceiling"] = base["ceiling"] / r["median_ms"]
    return rows


HEADER = (f"{'shape':<18}{'T':>7} {'dtype':<9}{'variant':<9}{'median ms':>11}{'TFLOP/s':>9}"
          f"{'x naive':>9}{'of ceil':>9}")


def format_row(r):
    return (f"{r['shape']:<18}{r['T']:>7} {r['dtype_key']:<9}{r['variant']:<9}{r['median_ms']:>11.3f}"
            f"{r['tflops']:>9.2f}{r['speedup_vs_naive']:>8.2f}x{r['fraction_of_ceiling']:>8.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 (default: CPU, fp32)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts T")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device")
        device, dtypes = torch.device("cuda"), args.dtypes or ["bf16"]
        tokens = args.tokens or [256, 1024, 8192, 16384]
        variants, repeats, warmup = ["naive", "torch", "triton"], args.repeats or 20, 5
    else:
        device, dtypes = torch.device("cpu"), args.dtypes or ["fp32"]
        tokens = args.tokens or [256, 1024]
        variants, repeats, warmup = ["naive", "torch"], args.repeats or 5, 1
    capability = "sm_{}{}".format(*torch.cuda.get_device_capability()) if args.gpu else "cpu"
    # Saved after every shape, so a run killed at its time limit keeps what it measured.
    results = PartialResults(args.json, op="nested_linear",
                             device=torch.cuda.get_device_name() if args.gpu else "cpu", capability=capability,
                             date=datetime.date.today().isoformat(), torch=torch.__version__, rows=[])
    print(HEADER, flush=True)
    for dtype_key in dtypes:
        for name in args.shapes:
            for t in tokens:
                for row in bench_shape(name, t, dtype_key, device, repeats, warmup, variants):
                    results.add("rows", row, format_row(row))
    results.finish()


if __name__ == "__main__":
    main()
