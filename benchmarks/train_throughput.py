"""Training throughput of `matta train`: tokens/s (and MFU on GPU) per mode on one model.

Times whole optimizer steps of the real trainer (`Run.train_step`: forward of the streams,
fused MatTA loss, backward, clipping, optimizer) for `--mode student`, `--mode ta` and
`--mode matta` on the same nested model and data, and prints the median step time, the
tokens/s, and the ratio of the MatTA step to the Student step plus the TA step.
MFU counts the FLOPs of the streams a mode trains (6 N per token over the matmul
parameters, the head included, plus attention), for MatTA the Student's and the TA's.
Baselines: the extracted plain Student and plain TA, each trained alone (AdamW, cross-
entropy); the "MatTA / (Student + TA)" ratio compares one MatTA step with the two separate
steps. Note: `--mode student` and `--mode ta` run both streams of the nested model (the
other stream's loss weight is 0), so their speed is MatTA's; the plain rows are the
single-model speeds.

    python benchmarks/train_throughput.py                      # CPU, the default tiny demo model
    python benchmarks/train_throughput.py --gpu --json out.json  # GPU: GPT-2 Medium MatTA, bf16

The GPU run (< 90 s on an H100/H200): GPT-2 Medium Student (24 layers, FFN 4096) nested in
a TA with FFN 8192 and 12 extra layers (36), block 1024, bf16 autocast; AdamW for the three
modes, Shampoo for MatTA, then MatTA with torch.compile if time is left. Random token ids
stand in for data (the speed does not depend on them).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from matta.train.config import make_config  # noqa: E402
from matta.train.trainer import Run  # noqa: E402


def measure(values: dict, steps: int, warmup: int) -> dict:
    """Median wall time of `steps` optimizer steps after `warmup` ones, for config `values`."""
    cfg = make_config({**values, "max_steps": warmup + steps + 1, "progress": False, "family": False,
                       "eval_interval": 0, "checkpoint_interval": 0})
    run = Run(cfg, log=lambda *a, **k: None)
    run.setup()
    sync = torch.cuda.synchronize if run.ctx.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        run.train_step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum
    step_s = statistics.median(times)
    result = {
        "mode": cfg.mode, "optimizer": cfg.optimizer, "compile": cfg.compile, "step_s": step_s,
        "tokens_per_s": tokens / step_s, "tokens_per_step": tokens, "flops_per_token": run.flops_per_token,
        "achieved_tflops": run.flops_per_token * tokens / step_s / 1e12,
        "mfu": run.flops_per_token * tokens / step_s / run.peak if run.peak else None,
    }
    if run.ctx.device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    del run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def measure_plain(values: dict, which: str, steps: int, warmup: int) -> dict:
    """Baseline: the extracted plain Student or TA (`extract`) trained alone with AdamW and
    F.cross_entropy, on the same data: what training the two models separately costs."""
    import torch.nn.functional as F

    from matta.extraction import extract

    cfg = make_config({**values, "mode": "matta", "max_steps": 1, "progress": False, "family": False})
    run = Run(cfg, log=lambda *a, **k: None)
    run.setup()
    model = extract(run.model, which).to(run.ctx.device).train()
    del run.model, run.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=run.ctx.device.type == "cuda" or None)
    forward = torch.compile(model) if cfg.compile else model
    sync = torch.cuda.synchronize if run.ctx.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        x, y = run.data.train.batch(i, cfg.batch_size)
        x, y = x.to(run.ctx.device), y.to(run.ctx.device)
        sync()
        t0 = time.perf_counter()
        with run.ctx.autocast():
            logits = forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = cfg.batch_size * cfg.block_size
    return {"mode": f"plain-{which}", "optimizer": "adamw", "compile": cfg.compile, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "tokens_per_step": tokens}


def print_table(rows, title):
    print(f"\n{title}")
    head = f"{'mode':13} {'optimizer':9} {'compile':7} {'step (s)':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        tflops = f"{r['achieved_tflops']:8.3f}" if "achieved_tflops" in r else f"{'-':>8}"
        print(f"{r['mode']:13} {r['optimizer']:9} {str(r['compile']):7} {r['step_s']:9.4f} {r['tokens_per_s']:10,.0f} "
              f"{tflops} {mfu:>6}")
    by_mode = {r["mode"]: r for r in rows if not r["compile"] and r["optimizer"] == "adamw"}
    if {"plain-student", "plain-ta", "matta"} <= set(by_mode):
        ratio = by_mode["matta"]["step_s"] / (by_mode["plain-student"]["step_s"] + by_mode["plain-ta"]["step_s"])
        print(f"MatTA step / (plain Student step + plain TA step, trained separately) = {ratio:.3f}")
        return ratio
    return None


def cpu_benchmark(args) -> dict:
    base = {"out": tempfile.mkdtemp(prefix="matta_bench_"), "threads": args.threads}
    rows = [measure({**base, "mode": mode}, args.steps, args.warmup) for mode in ("student", "ta", "matta")]
    rows.append(measure({**base, "mode": "matta", "optimizer": "shampoo"}, args.steps, args.warmup))
    rows += [measure_plain(base, which, args.steps, args.warmup) for which in ("student", "ta")]
    ratio = print_table(rows, f"CPU ({torch.get_num_threads()} threads), default demo model gpt2-tiny, "
                              "block 128 x batch 16, builtin corpus")
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows,
            "matta_over_sum": ratio}


def gpu_benchmark(args) -> dict:
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="matta_bench_"))
    data = tmp / "tokens.bin"
    vocab = 50257
    np.random.default_rng(0).integers(0, vocab, 2_000_000, dtype=np.uint16).tofile(data)
    base = {"out": str(tmp / "run"), "model": args.model, "data": str(data), "vocab_size": vocab,
            "block_size": args.block_size, "batch_size": args.batch_size, "ffn_ta": args.ffn_ta,
            "extra_layers": args.extra_layers, "dtype": "bf16" if args.device != "cpu" else "fp32",
            "device": args.device, "warmup_steps": 1, "precondition_frequency": 20,
            "start_preconditioning_step": 1}
    rows = []
    plan = [dict(mode="matta"), dict(plain="student"), dict(plain="ta"), dict(mode="student"), dict(mode="ta"),
            dict(mode="matta", optimizer="shampoo"), dict(mode="matta", compile=True)]
    for extra in plan:
        if time.perf_counter() - start > args.budget_s * (0.5 if extra.get("compile") else 0.85):
            print(f"skipping {extra}: time budget", file=sys.stderr)
            continue
        try:
            if "plain" in extra:
                rows.append(measure_plain(base, extra["plain"], args.steps, args.warmup))
            else:
                rows.append(measure({**base, **extra}, args.steps, args.warmup + (2 if extra.get("compile") else 0)))
        except torch.cuda.OutOfMemoryError:
            print(f"out of memory for {extra}", file=sys.stderr)
        print(rows[-1] if rows else None, file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ratio = print_table(rows, f"{device}: {args.model} MatTA (TA FFN {args.ffn_ta}, +{args.extra_layers} layers), "
                              f"block {args.block_size} x batch {args.batch_size}, bf16")
    return {"device": device, "model": args.model, "rows": rows, "matta_over_sum": ratio,
            "wall_s": time.perf_counter() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="GPU run (GPT-2 Medium MatTA)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default CPU 5, GPU 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the trainer's choice)")
    p.add_argument("--model", default="gpt2-medium", help="GPU run: model preset")
    p.add_argument("--ffn-ta", type=int, default=8192)
    p.add_argument("--extra-layers", type=int, default=12)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda", help="GPU run: device (cpu only to dry-run the GPU path)")
    p.add_argument("--budget-s", type=float, default=80.0)
    args = p.parse_args()
    args.steps = args.steps or 5
    if args.gpu:
        if args.device != "cpu" and not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA GPU")
        result = gpu_benchmark(args)
    else:
        result = cpu_benchmark(args)
    result.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                   "command": " ".join([os.path.basename(sys.executable), *sys.argv])})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
