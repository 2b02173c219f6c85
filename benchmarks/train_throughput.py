"""Training throughput of `matta train`: step time, tokens/s (and MFU on GPU) per mode.

Times whole optimizer steps of the real trainer (`Run.train_step`: forward of the streams
the objective reads, fused MatTA loss, backward, clipping, optimizer) for `--mode student`,
`--mode ta` and `--mode matta` on one nested model (the three objectives share the model
and its AdamW; only the objective changes, as `matta train --mode` changes it), beside the
extracted plain Student and plain TA each trained alone (AdamW, cross-entropy): what
training the two models separately costs. All rows take turns step by step, so load from
other processes falls on all of them alike; medians. Reported ratios:

    Student-only step / MatTA step      what a Student-only run saves (it computes one stream)
    MatTA step / (Student + TA steps)   one MatTA step against the two models trained apart

MFU counts the FLOPs of the streams a row trains (6 N per token over the matmul parameters,
the head included, plus attention).

    python benchmarks/train_throughput.py                        # CPU: gpt2-tiny and gpt2 presets
    python benchmarks/train_throughput.py --gpu --json out.json  # GPU: GPT-2 Medium MatTA, bf16
    python benchmarks/train_throughput.py --explain              # what `--compile` compiles (no timing)

`--explain` runs torch._dynamo.explain on the nested model's forward (what `--compile`
compiles: `model.compile()`) for both stream choices and both families, and on the whole
objective (forward + fused loss, which training keeps eager), and prints the graphs, the
graph breaks with their reasons, and the nested-linear op nodes.

The GPU run: GPT-2 Medium Student (24 layers, FFN 4096) nested in a TA with FFN 8192 and 12
extra layers (36), block 1024, bf16 autocast, built once; then, on the same model, MatTA with
Shampoo and MatTA compiled, each only where the time left in --budget-s covers its estimate
(GPU_EXTRAS). Random token ids stand in for data (the speed does not depend on them). The
JSON is rewritten after every round of timing, so a run killed at its limit keeps its rows.
"""
import argparse
import dataclasses
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
import torch.nn.functional as F  # noqa: E402

from matta.extraction import extract  # noqa: E402
from matta.train import Run, make_config  # noqa: E402
from matta.train.objective import Objective, criterion_for, streams_of  # noqa: E402
from matta.train.optimizers import build_optimizer  # noqa: E402
from matta.train.tasks import task_for  # noqa: E402
from matta.train.trainer import peak_flops  # noqa: E402
from partial_results import PartialResults  # noqa: E402

MODES = ("student", "ta", "matta")


def setup_run(values: dict) -> Run:
    cfg = make_config({**values, "max_steps": 10**6, "progress": False, "family": False, "eval_interval": 0,
                       "checkpoint_interval": 0})
    run = Run(cfg, log=lambda *a, **k: None)
    run.setup()
    return run


def nested_step(run: Run, mode: str):
    """One trainer step of `run` with the objective of `--mode mode` (single process)."""
    objective = Objective(run.task, run.model, criterion_for(dataclasses.replace(run.cfg, mode=mode)))

    def step():
        run.objective = run.engine = objective
        run.schedule.criterion = objective.criterion
        run.train_step()

    return step


def plain_step(run: Run, which: str):
    """One step of the extracted plain Student or TA trained alone (AdamW, cross-entropy)."""
    cfg, device = run.cfg, run.ctx.device
    model = extract(run.model, which).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if cfg.compile else model
    count = [0]

    def step():
        x, y = (t.to(device) for t in run.data.train.batch(count[0], cfg.batch_size))
        count[0] += 1
        with run.ctx.autocast():
            logits = forward(x)
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict, warmup: int, reps: int, device, on_round=lambda medians: None) -> dict:
    """Median seconds per step of each entry; the entries take turns in every round.
    `on_round` gets the medians so far after every round (a killed run keeps them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
        on_round({name: statistics.median(t) for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def rows_for(run: Run, medians: dict, optimizer="adamw", compiled=None) -> list:
    tokens = run.cfg.batch_size * run.cfg.block_size * run.cfg.grad_accum
    peak = peak_flops(run.ctx.device)
    rows = []
    for name, step_s in medians.items():
        kind, _, mode = name.partition(" ")
        flops = run.model.flops_per_token(run.cfg.block_size, streams_of(mode, run.cfg.loss_weights))
        rows.append({"row": name, "optimizer": optimizer,
                     "compile": run.cfg.compile if compiled is None else compiled, "step_s": step_s,
                     "tokens_per_s": tokens / step_s, "tokens_per_step": tokens, "flops_per_token": flops,
                     "achieved_tflops": flops * tokens / step_s / 1e12,
                     "mfu": flops * tokens / step_s / peak if peak else None})
    return rows


def ratios(rows) -> dict:
    by = {r["row"]: r["step_s"] for r in rows if r["optimizer"] == "adamw" and not r["compile"]}
    out = {}
    if {"nested student", "nested matta"} <= set(by):
        out["student_over_matta"] = by["nested student"] / by["nested matta"]
    if {"nested matta", "plain student", "plain ta"} <= set(by):
        out["matta_over_plain_sum"] = by["nested matta"] / (by["plain student"] + by["plain ta"])
    if {"nested student", "plain student"} <= set(by):
        out["nested_student_over_plain_student"] = by["nested student"] / by["plain student"]
    return out


def print_table(rows, title, ratio):
    print(f"\n{title}")
    head = f"{'row':15} {'optimizer':9} {'compile':7} {'step (s)':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{r['row']:15} {r['optimizer']:9} {str(r['compile']):7} {r['step_s']:9.4f} {r['tokens_per_s']:10,.0f} "
              f"{r['achieved_tflops']:8.3f} {mfu:>6}")
    names = {"student_over_matta": "Student-only step / MatTA step",
             "matta_over_plain_sum": "MatTA step / (plain Student step + plain TA step)",
             "nested_student_over_plain_student": "nested Student-only step / plain Student step"}
    for key, value in ratio.items():
        print(f"{names[key]} = {value:.3f}")


def measure(values: dict, args, *, plain=True) -> tuple:
    """The modes of one nested model (and the plain baselines), interleaved."""
    run = setup_run(values)
    steps = {f"nested {mode}": nested_step(run, mode) for mode in MODES}
    if plain:
        steps.update({f"plain {which}": plain_step(run, which) for which in ("student", "ta")})
    rows = rows_for(run, time_interleaved(steps, args.warmup, args.steps, run.ctx.device))
    return run, rows


CPU_PRESETS = {  # the demo's model, and GPT-2 small (124M Student) on a CPU-sized batch
    "gpt2-tiny": {"model": "gpt2-tiny", "batch_size": 16, "block_size": 128},
    "gpt2": {"model": "gpt2", "batch_size": 4, "block_size": 128},
}


def cpu_benchmark(args) -> dict:
    out = {}
    for preset in args.presets:
        values = {"out": tempfile.mkdtemp(prefix="matta_bench_"), "threads": args.threads, **CPU_PRESETS[preset]}
        run, rows = measure(values, args)
        ratio = ratios(rows)
        student, ta = run.model.stream_shape("student"), run.model.stream_shape("ta")
        print_table(rows, f"CPU ({torch.get_num_threads()} thread(s)), {preset}: Student {student.n_layer} layers d "
                          f"{student.d_model} FFN {student.ffn}, TA {ta.n_layer} layers FFN {ta.ffn}, builtin corpus "
                          f"(vocab {run.data.vocab_size}), block {values['block_size']} x batch {values['batch_size']}",
                    ratio)
        out[preset] = {"rows": rows, **ratio}
        del run
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "presets": out}


# What each GPU extra is expected to cost (s), so that it starts only where it can finish
# inside --budget-s: Shampoo's first step allocates its state and roots all 1541 factors
# (the GPT-2 Medium MatTA model at blocks of 1024); compiling the 36-layer model's forward
# takes about a minute of host time. Estimates, not measurements: the first GPU run records
# what each took (extras[].seconds).
GPU_EXTRAS = (("shampoo", 40.0), ("compiled", 100.0))


def gpu_benchmark(args, results) -> None:
    """GPT-2 Medium MatTA on the GPU: the modes and the plain baselines with AdamW, then on the
    same model (built once: building it takes seconds of host time) MatTA with Shampoo and
    MatTA compiled, each where the time left in --budget-s covers its estimate. Rows are
    saved into `results` after every round."""
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
    run = setup_run(base)
    device = run.ctx.device
    results.set(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", model=args.model,
                setup_s=time.perf_counter() - start, rows=[], extras=[])
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    steps = {f"nested {mode}": nested_step(run, mode) for mode in MODES}
    steps.update({f"plain {which}": plain_step(run, which) for which in ("student", "ta")})
    rows = rows_for(run, time_interleaved(steps, args.warmup, args.steps, device,
                                          lambda medians: results.replace("rows", rows_for(run, medians))))
    if device.type == "cuda":
        for r in rows:
            r["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results.replace("rows", rows)
    print_table(rows, "AdamW", ratios(rows))
    adamw = run.optimizer
    for label, estimate in GPU_EXTRAS:
        left = args.budget_s - (time.perf_counter() - start)
        if left < estimate:
            print(f"skipping MatTA {label}: {left:.0f} s left of --budget-s, estimated {estimate:.0f} s", flush=True)
            results.add("extras", {"label": label, "skipped": f"{left:.0f} s left, estimated {estimate:.0f} s"})
            continue
        began = time.perf_counter()
        try:
            if label == "shampoo":
                run.optimizer = run.schedule.optimizer = build_optimizer(
                    dataclasses.replace(run.cfg, optimizer="shampoo"), run.model)
            else:
                run.optimizer = run.schedule.optimizer = adamw
                run.model.compile()
            medians = time_interleaved({"nested matta": nested_step(run, "matta")}, args.warmup, args.steps, device)
        except torch.cuda.OutOfMemoryError:
            print(f"out of memory for MatTA {label}", file=sys.stderr, flush=True)
            results.add("extras", {"label": label, "skipped": "out of memory"})
            continue
        extra = rows_for(run, medians, optimizer="shampoo" if label == "shampoo" else "adamw",
                         compiled=label == "compiled")
        for r in extra:
            r["row"] = f"{r['row']} ({label})"
            results.add("rows", r)
        results.add("extras", {"label": label, "seconds": time.perf_counter() - began, "estimate_s": estimate})
        print_table(extra, f"MatTA {label}", {})
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    rows = results.doc["rows"]
    ratio = ratios(rows)
    print_table(rows, f"{results.doc['device']}: {args.model} MatTA (TA FFN {args.ffn_ta}, +{args.extra_layers} layers), "
                      f"block {args.block_size} x batch {args.batch_size}, bf16", ratio)
    results.set(wall_s=time.perf_counter() - start, **ratio)


def explain_report() -> list:
    from matta.train.run_dir import build_model

    rows = []
    for preset in ("gpt2-tiny", "gau-tiny"):
        cfg = make_config({"model": preset, "extra_layers": 2})
        torch.manual_seed(0)
        model = build_model(cfg, 2048)
        x = torch.randint(0, 2048, (2, 64))
        cases = [(f"model, stream={stream}", model, (x,), {"return_hidden": True, "stream": stream})
                 for stream in (None, "student", "ta")]
        objective = Objective(task_for(cfg), model, criterion_for(cfg))
        cases.append(("objective (model + fused loss)", objective, (x, torch.randint(0, 2048, (2, 64))), {}))
        for what, module, args, kwargs in cases:
            torch._dynamo.reset()
            ex = torch._dynamo.explain(module)(*args, **kwargs)
            nested = sum(1 for g in ex.graphs for n in g.graph.nodes if "nested_linear" in str(n.target))
            reasons = sorted({b.reason.splitlines()[0][:120] for b in ex.break_reasons})
            rows.append({"preset": preset, "what": what, "graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
                         "nested_linear_nodes": nested, "break_reasons": reasons})
            print(f"{preset:10} {what:32} graphs {ex.graph_count:2}  breaks {ex.graph_break_count:2}  "
                  f"nested_linear nodes {nested:3}" + "".join(f"\n    break: {r}" for r in reasons))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="GPU run (GPT-2 Medium MatTA)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the trainer's)")
    p.add_argument("--presets", nargs="+", default=list(CPU_PRESETS), choices=list(CPU_PRESETS), help="CPU run: presets")
    p.add_argument("--model", default="gpt2-medium", help="GPU run: model preset")
    p.add_argument("--ffn-ta", type=int, default=8192)
    p.add_argument("--extra-layers", type=int, default=12)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda", help="GPU run: device (cpu only to dry-run the GPU path)")
    p.add_argument("--budget-s", type=float, default=80.0,
                   help="GPU run: seconds it may take; an extra starts only if its estimate fits")
    p.add_argument("--explain", action="store_true", help="report torch.compile's graphs and breaks instead of timing")
    args = p.parse_args()
    if args.gpu and args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU")
    results = PartialResults(args.json, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             torch=torch.__version__, load_average=os.getloadavg(),
                             command=" ".join([os.path.basename(sys.executable), *sys.argv]))
    if args.explain:
        results.set(explain=explain_report())
    elif args.gpu:
        gpu_benchmark(args, results)
    else:
        results.set(**cpu_benchmark(args))
    results.finish()


if __name__ == "__main__":
    main()
