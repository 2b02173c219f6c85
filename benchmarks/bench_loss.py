"""MatTA loss on the LM head: naive (two F.linear, full logits, log_softmax, autograd) against
`fused_linear_matta_loss` (chunked, never full logits). Forward + backward.

CPU (default): time and peak extra RSS at T tokens (default 4096), d = 1024, V = 50257,
fp32 (or bf16 autocast over fp32 parameters, as training runs). Each measurement is one
subprocess (so the peak RSS of one variant cannot pollute the other's), and the variants
take turns, round after round, so load changes hit both; medians over the rounds. "extra"
is the peak RSS during the loss minus the peak after the inputs were made.

    python benchmarks/bench_loss.py                    # T = 4096 (minutes on 2 cores)
    python benchmarks/bench_loss.py --tokens 512       # quick
    python benchmarks/bench_loss.py --dtype bf16       # under torch.autocast(bfloat16)
    python benchmarks/bench_loss.py --gpu --json out.json
GPU: T = 4096 and 16384, bf16, time (CUDA events) and max_memory_allocated above the inputs;
also checks that the fused loss and weight gradient agree with the naive ones.
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta.ops import fused_linear_matta_loss  # noqa: E402
from partial_results import PartialResults  # noqa: E402

VOCAB = 50257


def naive_loss(h_s, h_ta, weight, target, weights=(1.0, 1.0, 1.0)):
    """What a user writes without matta: full logits of both heads, log_softmax, three losses."""
    d_s = h_s.shape[-1]
    log_p_s = torch.log_softmax(F.linear(h_s, weight[:, :d_s]).float(), -1)
    log_p_ta = torch.log_softmax(F.linear(h_ta, weight).float(), -1)
    l_s = F.nll_loss(log_p_s, target)
    l_ta = F.nll_loss(log_p_ta, target)
    keep = (target != -100).float()
    l_d = (-(log_p_ta.detach().exp() * log_p_s).sum(-1) * keep).sum() / keep.sum()
    return weights[0] * l_s + weights[1] * l_ta + weights[2] * l_d


def fused_loss(h_s, h_ta, weight, target, chunk_size=None):
    return fused_linear_matta_loss(h_s, h_ta, weight, target, chunk_size=chunk_size).loss


def make_inputs(n_tokens, d_s, d_ta, dtype, device, seed=0):
    """In-place initialisation, so making the inputs leaves no transient RSS peak."""
    g = torch.Generator(device=device).manual_seed(seed)
    h_s = torch.empty(n_tokens, d_s, dtype=dtype, device=device).normal_(generator=g)
    h_ta = torch.empty(n_tokens, d_ta, dtype=dtype, device=device).normal_(generator=g)
    weight = torch.empty(VOCAB, d_ta, dtype=dtype, device=device).normal_(generator=g).mul_(1 / math.sqrt(d_ta))
    target = torch.randint(0, VOCAB, (n_tokens,), generator=g, device=device)
    target[::97] = -100
    return [h_s.requires_grad_(), h_ta.requires_grad_(), weight.requires_grad_()], target


def step(variant, inputs, target, chunk_size, autocast_dtype=None):
    for t in inputs:
        t.grad = None
    device = inputs[0].device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = naive_loss(*inputs, target) if variant == "naive" else fused_loss(*inputs, target, chunk_size)
    loss.backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------
# CPU


def cpu_worker(args):
    torch.set_num_threads(args.threads)
    inputs, target = make_inputs(args.tokens, args.student_dim, args.dim, torch.float32, "cpu")
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):  # not timed
        step(args.worker, inputs, target, args.chunk_size, autocast_dtype)
    start = time.perf_counter()
    loss = step(args.worker, inputs, target, args.chunk_size, autocast_dtype)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.worker, "seconds": seconds, "peak_extra_rss_mib": (peak_kb - base_kb) / 1024,
                      "loss": loss.item()}))


def run_cpu(args):
    runs = {"naive": [], "fused": []}
    for round_ in range(args.repeats):
        for variant in (("naive", "fused") if round_ % 2 == 0 else ("fused", "naive")):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--tokens", str(args.tokens),
                   "--dim", str(args.dim), "--student-dim", str(args.student_dim), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--dtype", args.dtype]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env={**os.environ, "MATTA_BACKEND": "torch"})
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {variant: {"median_s": statistics.median(r["seconds"] for r in rs),
                         "times_s": [r["seconds"] for r in rs],
                         "peak_extra_rss_mib": statistics.median(r["peak_extra_rss_mib"] for r in rs),
                         "loss": rs[-1]["loss"]} for variant, rs in runs.items()}
    naive, fused = results["naive"], results["fused"]
    rows = [
        f"CPU {args.dtype}, T={args.tokens}, d_S={args.student_dim}, d_TA={args.dim}, V={VOCAB}, "
        f"{args.threads} threads, median of {args.repeats} interleaved rounds (forward + backward)",
        f"{'variant':8s} {'median s':>10s} {'peak extra RSS MiB':>20s}  times s",
    ]
    for name in ("naive", "fused"):
        r = results[name]
        rows.append(f"{name:8s} {r['median_s']:10.2f} {r['peak_extra_rss_mib']:20.0f}  "
                    + " ".join(f"{t:.2f}" for t in r["times_s"]))
    rows.append(f"fused/naive: time {fused['median_s'] / naive['median_s']:.2f}x, "
                f"memory {fused['peak_extra_rss_mib'] / naive['peak_extra_rss_mib']:.3f}x; "
                f"loss {naive['loss']:.6f} vs {fused['loss']:.6f}")
    print("\n".join(rows))
    return {"cpu": results}


# ----------------------------------------------------------------------------------------
# GPU


def run_gpu(args, results):
    """Rows go into `results` (saved) and are printed as each is measured."""
    device = torch.device("cuda")
    results.set(device=torch.cuda.get_device_name(), gpu=[])
    print(f"GPU {torch.cuda.get_device_name()}, bf16, d_S={args.student_dim}, d_TA={args.dim}, V={VOCAB}, "
          f"median of {args.repeats} (forward + backward)", flush=True)
    print(f"{'T':>6s} {'variant':8s} {'median ms':>10s} {'peak extra MiB':>15s}", flush=True)
    for n_tokens in (4096, 16384):
        inputs, target = make_inputs(n_tokens, args.student_dim, args.dim, torch.bfloat16, device)
        check, rows = {}, {}
        for variant in ("naive", "fused"):
            step(variant, inputs, target, None)  # warm-up (and Triton compilation)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(args.repeats):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                loss = step(variant, inputs, target, None)
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end) / 1000)
            peak = torch.cuda.max_memory_allocated() - base
            check[variant] = (loss.float(), inputs[2].grad.float())
            rows[variant] = {"tokens": n_tokens, "variant": variant, "median_s": statistics.median(times),
                             "peak_extra_mib": peak / 2**20}
            if variant == "fused":
                (l_n, g_n), (l_f, g_f) = check["naive"], check["fused"]
                rows[variant]["loss_rel_diff"] = abs(l_f - l_n).item() / abs(l_n).item()
                rows[variant]["dweight_rel_diff"] = ((g_f - g_n).norm() / g_n.norm()).item()
            r = rows[variant]
            results.add("gpu", r, f"{r['tokens']:6d} {r['variant']:8s} {1000 * r['median_s']:10.2f} "
                                  f"{r['peak_extra_mib']:15.0f}")
        naive, fused = rows["naive"], rows["fused"]
        print(f"T={n_tokens}: fused speed-up {naive['median_s'] / fused['median_s']:.2f}x, memory "
              f"{fused['peak_extra_mib'] / naive['peak_extra_mib']:.3f}x; loss rel diff "
              f"{fused['loss_rel_diff']:.1e}, dW rel diff {fused['dweight_rel_diff']:.1e}", flush=True)
        del inputs, target, check
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU part (T = 4096 and 16384, bf16)")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--tokens", type=int, default=4096, help="CPU: tokens T (default 4096)")
    parser.add_argument("--dim", type=int, default=1024, help="d_TA (default 1024)")
    parser.add_argument("--student-dim", type=int, default=None, help="d_S (default: d_TA, a shared head)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs (CPU: interleaved rounds, one subprocess each; default: 3 CPU, 10 GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="CPU: untimed runs first in each subprocess (default 1)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="CPU: fp32, or bf16 autocast over fp32 parameters (default fp32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk size (default: automatic)")
    parser.add_argument("--worker", choices=("naive", "fused"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.student_dim = args.student_dim or args.dim
    args.repeats = args.repeats or (10 if args.gpu else 3)
    if args.worker:
        return cpu_worker(args)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    results = PartialResults(args.json, date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    if args.gpu:
        run_gpu(args, results)
    else:
        results.set(**run_cpu(args))
    results.finish()


if __name__ == "__main__":
    main()
