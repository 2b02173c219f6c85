"""Inverse 4th roots of the GPT-2 Medium MatTA Shampoo factors, and the optimizer's step cost.

Factor shapes: d = 1024, 36 TA layers of c_attn (3072x1024), c_proj (1024x1024), FFN up
(8192x1024) and down (1024x8192), plus wte (50304x1024) and wpe (1024x1024). With blocks of
1024 that is 1541 factors of 1024 (and one of 128); with blocks of 256, 24,634 of 256 (and
4 of 128). Each strategy roots a stack of these (synthetic SPD factors with eigenvalues
log-spaced over 1e-5..1, epsilon 1e-12):

    (a) loop   a Python loop of torch.linalg.eigh, one per block (DistributedShampoo's way)
    (b) batch  one batched torch.linalg.eigh call
    (c) auto   matta.ops.matrix_inverse_root(method="auto") (measured once per shape first;
               that one-off measurement is reported as auto_setup_s)
    (d) newton matta's batched coupled Newton, for reference

Time: median of --repeats runs over --count matrices per size, also scaled to the full count.
Error: max over distinct matrices of ||X - X64|| / ||X64||, X64 from the exact float64
eigendecomposition the factors were built from.

    python benchmarks/bench_shampoo.py                      # CPU, reduced counts (minutes)
    python benchmarks/bench_shampoo.py --count 4 --repeats 1
    python benchmarks/bench_shampoo.py --blocks 1024 --strategies loop batch auto  # no CPU Newton at 1024
    python benchmarks/bench_shampoo.py --gpu --json out.json   # CUDA, < 60 s

The GPU part also times an optimizer step of Shampoo against torch.optim.AdamW on GPT-2
Medium MatTA parameter shapes (random gradients; --layers of the 36 TA layers plus the
embeddings), amortised over precondition_frequency = 20 steps (one of them recomputes roots).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta.ops import matrix_functions  # noqa: E402
from matta.ops.matrix_functions import matrix_inverse_root  # noqa: E402
from partial_results import PartialResults  # noqa: E402

D_MODEL, TA_LAYERS, VOCAB_PADDED = 1024, 36, 50304
EPSILON = 1e-12


def gpt2_medium_matta_shapes(layers=TA_LAYERS):
    per_layer = [(3 * D_MODEL, D_MODEL), (D_MODEL, D_MODEL), (8 * D_MODEL, D_MODEL), (D_MODEL, 8 * D_MODEL)]
    return per_layer * layers + [(VOCAB_PADDED, D_MODEL), (D_MODEL, D_MODEL)]


def factor_counts(block, layers=TA_LAYERS):
    """{n: how many n x n factors} for the given block size (ragged last blocks included)."""
    counts = {}
    for rows, cols in gpt2_medium_matta_shapes(layers):
        row_sizes = [min(block, rows - r) for r in range(0, rows, block)]
        col_sizes = [min(block, cols - c) for c in range(0, cols, block)]
        for n in row_sizes:
            counts[n] = counts.get(n, 0) + len(col_sizes)
        for n in col_sizes:
            counts[n] = counts.get(n, 0) + len(row_sizes)
    return counts


def factor_batch(count, n, device, distinct=4):
    """`count` SPD factors (tiles of `distinct` different ones) and the float64 truth of each distinct one."""
    generator = torch.Generator().manual_seed(n)
    distinct = min(distinct, count)
    q, _ = torch.linalg.qr(torch.randn(distinct, n, n, generator=generator, dtype=torch.float64))
    w = torch.logspace(-5, 0, n, dtype=torch.float64)
    a64 = (q * w) @ q.mT
    truth = (q * (w + EPSILON).pow(-0.25)) @ q.mT
    a = a64.to(device=device, dtype=torch.float32)
    stack = a.repeat(math.ceil(count / distinct), 1, 1)[:count].contiguous()
    return stack, truth.to(device), distinct


def eigh_root(a):
    a = a + EPSILON * torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    w, q = torch.linalg.eigh(a)
    return (q * w.clamp_min(EPSILON).pow(-0.25).unsqueeze(-2)) @ q.mT


STRATEGIES = {
    "loop": lambda a: torch.stack([eigh_root(m) for m in a]),
    "batch": eigh_root,
    "auto": lambda a: matrix_inverse_root(a, epsilon=EPSILON, method="auto"),
    "newton": lambda a: matrix_inverse_root(a, epsilon=EPSILON, method="newton"),
}


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_roots(device, block, count, repeats, strategies):
    """Yields one row per factor size, as each is measured."""
    for n, full in sorted(factor_counts(block).items(), reverse=True):
        sample = min(full, count if n == block else max(1, count // 8))
        a, truth, distinct = factor_batch(sample, n, device)
        start = time.perf_counter()
        matrix_functions.choose_root_method(n, sample, device)  # auto's one-off measurement
        setup = time.perf_counter() - start
        row = {"block": block, "n": n, "full_count": full, "timed_count": sample, "auto_setup_s": setup,
               "auto_choice": matrix_functions.choose_root_method(n, sample, device)}
        for name in strategies:
            if device.type == "cuda":
                STRATEGIES[name](a[:1])  # warm-up (kernel compilation, cuSOLVER handles)
            seconds, x = timed(lambda: STRATEGIES[name](a), device, repeats)
            error = (torch.linalg.matrix_norm(x[:distinct].double() - truth) / torch.linalg.matrix_norm(truth)).max()
            row[f"{name}_s"] = seconds
            row[f"{name}_full_s"] = seconds * full / sample
            row[f"{name}_max_rel_error"] = error.item()
        print_row(row, strategies)
        yield row


def print_row(row, strategies):
    times = "  ".join(f"{s}={row[f'{s}_s']:.3f}s (err {row[f'{s}_max_rel_error']:.1e})" for s in strategies)
    best_eigh = min(row["loop_s"], row["batch_s"])
    print(f"block {row['block']:5d} n {row['n']:5d} x{row['timed_count']:4d} (of {row['full_count']}): {times}"
          f"  auto={row['auto_choice']}  auto/best_eigh={row['auto_s'] / best_eigh:.2f}  loop/auto={row['loop_s'] / row['auto_s']:.2f}",
          flush=True)


def bench_optimizer_step(device, layers, frequency=20):
    from matta.optim import Shampoo

    shapes = gpt2_medium_matta_shapes(layers)
    results = {}
    for name in ("adamw", "shampoo"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        params += [torch.nn.Parameter(torch.zeros(s[0], device=device)) for s in shapes]  # biases
        grads = [torch.randn_like(p) * 1e-3 for p in params]
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
        else:
            opt = Shampoo(params, lr=1e-4, weight_decay=0.1, precondition_frequency=frequency,
                          start_preconditioning_step=1, max_preconditioner_dim=1024)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()  # first step: state allocation, roots, auto's measurement
        seconds, _ = timed(lambda: [opt.step() for _ in range(frequency)], device, 1)
        results[f"{name}_step_ms"] = 1e3 * seconds / frequency
    results["shampoo_overhead_ms"] = results["shampoo_step_ms"] - results["adamw_step_ms"]
    results["layers"] = layers
    results["precondition_frequency"] = frequency
    print(f"optimizer step ({layers} TA layers + embeddings), amortised over {frequency} steps: "
          f"AdamW {results['adamw_step_ms']:.1f} ms, Shampoo {results['shampoo_step_ms']:.1f} ms", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (full-size timings, optimizer step)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--count", type=int, help="matrices timed per block size (default: CPU 6, GPU 48)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per strategy; the median is kept")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--layers", type=int, default=4, help="TA layers in the GPU optimizer-step timing")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    count = args.count or (48 if args.gpu else 6)
    strategies = sorted(set(args.strategies) | {"loop", "batch", "auto"}, key=list(STRATEGIES).index)
    print(f"device {torch.cuda.get_device_name() if args.gpu else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, count {count}, repeats {args.repeats}", flush=True)
    # Saved after every row, so a run killed at its time limit keeps what it measured.
    report = PartialResults(args.json, device=torch.cuda.get_device_name() if args.gpu else "cpu",
                            torch=torch.__version__, threads=torch.get_num_threads(), roots=[])
    for block in args.blocks:
        # Small blocks: time proportionally more matrices so each size is timed on a real batch.
        block_count = count if block >= 1024 else count * (1024 // block) ** 2 // 2
        for row in bench_roots(device, block, block_count, args.repeats, strategies):
            report.add("roots", row)
    if args.gpu:
        report.set(optimizer_step=bench_optimizer_step(device, args.layers))
    report.finish()


if __name__ == "__main__":
    main()
