"""The summary that benchmarks/gpu_check.sh prints last, from the files its steps left.

    python3 benchmarks/gpu_summary.py WORK                       # print the summary
    python3 benchmarks/gpu_summary.py --merge WORK --out FILE    # every step's JSON in one file

A lease returns only the last 12,000 characters of output, so the summary is compact (every
nested-linear row kept: one line per shape, token count and dtype, with each variant's
median) and reads whatever is there: a step killed at its limit left a partial JSON
(`"complete": false`, marked "partial" here), a step that failed left none. Standard
library only, so it runs even where torch does not import.
"""
import argparse
import json
import os
import sys
from pathlib import Path

# Steps of gpu_check.sh that write a JSON of the same name.
BENCHMARKS = ("nested_linear", "nested_linear_fp32", "matta_loss", "models", "train_throughput", "cost_prediction",
              "shampoo_roots")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge(work: Path) -> dict:
    return {name: doc for name in BENCHMARKS if (doc := read_json(work / f"{name}.json")) is not None}


def _state(doc) -> str:
    return "" if doc.get("complete", True) else "  (partial: the step ended before it finished)"


def nested_linear_lines(doc) -> list:
    by_case = {}
    for r in doc.get("rows", []):
        by_case.setdefault((r["dtype_key"], r["shape"], r["T"]), {})[r["variant"]] = r
    lines = [f"{'dtype':<5} {'shape':<16} {'T':>6} {'ceiling':>8} {'naive':>8} {'torch':>8} {'triton':>8} "
             f"{'TFLOP/s':>8} {'x naive':>8} {'of ceil':>7}"]
    for (dtype, shape, t), variants in by_case.items():
        ms = [f"{variants[v]['median_ms']:8.3f}" if v in variants else f"{'-':>8}"
              for v in ("ceiling", "naive", "torch", "triton")]
        best = variants.get("triton") or variants.get("torch") or next(iter(variants.values()))
        lines.append(f"{dtype:<5} {shape:<16} {t:>6} {' '.join(ms)} {best['tflops']:8.1f} "
                     f"{best['speedup_vs_naive']:7.2f}x {best['fraction_of_ceiling']:7.2f}")
    return lines


def matta_loss_lines(doc) -> list:
    lines = []
    for r in doc.get("gpu", []):
        extra = f"  loss rel diff {r['loss_rel_diff']:.1e}, dW rel diff {r['dweight_rel_diff']:.1e}" \
            if "loss_rel_diff" in r else ""
        lines.append(f"T={r['tokens']:<6} {r['variant']:<6} {1000 * r['median_s']:9.2f} ms  "
                     f"peak extra {r['peak_extra_mib']:7.0f} MiB{extra}")
    return lines


def models_lines(doc) -> list:
    names = ("student", "ta", "nested_student_only", "nested_ta_only", "matta_auto", "matta_torch")
    lines = [f"{name:<20} {doc[f'{name}_ms']:9.2f} ms" for name in names if f"{name}_ms" in doc]
    lines += [f"{key}: {doc[key]}" for key in doc if key.endswith("_error")]
    if "matta_auto_ratio" in doc:
        lines.append(f"MatTA (auto) / (Student + TA separate) = {doc['matta_auto_ratio']:.3f}")
    if "rounds" in doc:
        lines.append(f"rounds timed: {doc['rounds']}")
    return lines


def train_throughput_lines(doc) -> list:
    lines = []
    for r in doc.get("rows", []):
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "    -"
        lines.append(f"{r['row']:<26} {r['step_s']:8.4f} s/step {r['tokens_per_s']:10,.0f} tok/s "
                     f"{r['achieved_tflops']:7.1f} TFLOP/s MFU {mfu}")
    for e in doc.get("extras", []):
        lines.append(f"extra {e['label']}: " + (f"skipped ({e['skipped']})" if "skipped" in e else
                                                 f"{e['seconds']:.0f} s (estimated {e['estimate_s']:.0f} s)"))
    ratios = ("student_over_matta", "matta_over_plain_sum", "nested_student_over_plain_student")
    lines += [f"{key} = {doc[key]:.3f}" for key in ratios if key in doc]
    return lines + ([f"model built in {doc['setup_s']:.0f} s"] if "setup_s" in doc else [])


def cost_prediction_lines(doc) -> list:
    """The cost model's prediction of train_throughput's MatTA AdamW step (matta cost --card auto)."""
    return [f"predicted on {doc['card']}: {doc['step_s']:.4f} s/step {doc['tokens_per_s']:10,.0f} tok/s "
            f"MFU {100 * doc['mfu']:5.1f}% (a model; compare the measured MatTA row above)"]


def shampoo_lines(doc) -> list:
    lines = []
    for r in doc.get("roots", []):
        times = " ".join(f"{k[:-2]} {r[k]:.3f}s" for k in r if k.endswith("_s") and not k.endswith("_full_s")
                         and k != "auto_setup_s")
        lines.append(f"block {r['block']} n {r['n']} x{r['timed_count']} of {r['full_count']}: {times}; "
                     f"auto -> {r['auto_choice']}")
    if "optimizer_step" in doc:
        o = doc["optimizer_step"]
        lines.append(f"optimizer step ({o['layers']} layers): AdamW {o['adamw_step_ms']:.1f} ms, "
                     f"Shampoo {o['shampoo_step_ms']:.1f} ms")
    return lines


FORMATTERS = {"nested_linear": nested_linear_lines, "nested_linear_fp32": nested_linear_lines,
              "matta_loss": matta_loss_lines, "models": models_lines, "train_throughput": train_throughput_lines,
              "cost_prediction": cost_prediction_lines,
              "shampoo_roots": shampoo_lines}


def step_lines(work: Path) -> list:
    lines = []
    try:
        rows = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()[1:]]
    except OSError:
        return ["(no steps.tsv)"]
    for name, code, seconds, limit in rows:
        if code == "0":
            state = "ok"
        elif code in ("124", "137"):
            state = f"KILLED at its {limit} s limit"
        elif code in ("skipped", "no-cuda"):
            state = "skipped (no CUDA device)" if code == "no-cuda" else "skipped (deadline)"
        else:
            state = f"FAILED (exit {code})"
        lines.append(f"{name:<20} {state:<28} {seconds:>4} s")
    return lines


def tail(path: Path, n: int) -> list:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def summary(work: Path) -> str:
    out = ["=" * 20 + " matta gpu_check summary", *tail(work / "machine.txt", 5), "", "-- steps", *step_lines(work)]
    for name in BENCHMARKS:
        doc = read_json(work / f"{name}.json")
        if doc is None:
            out += ["", f"-- {name}: no results"] + [f"   {line}" for line in tail(work / f"{name}.txt", 2)]
            continue
        out += ["", f"-- {name}{_state(doc)}"]
        try:
            out += FORMATTERS[name](doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            out.append(f"(unreadable: {type(exc).__name__}: {exc})")
        if name == "nested_linear_fp32":
            out += ["", "-- dispatch table", *tail(work / "dispatch_table.txt", 12)]
    tests = tail(work / "kernel_tests.txt", 400)
    failed = [line for line in tests if line.startswith(("FAILED", "ERROR"))][:10]
    out += ["", "-- kernel_tests", *failed, *tests[-1:]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", help="the folder gpu_check.sh wrote its steps' files into")
    parser.add_argument("--merge", metavar="WORK", help="write every step's JSON into --out instead")
    parser.add_argument("--out", help="with --merge: the file to write (replaced atomically)")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        tmp = f"{args.out}.tmp"
        Path(tmp).write_text(json.dumps(merge(Path(args.merge)), indent=1) + "\n")
        os.replace(tmp, args.out)
        return 0
    if not args.work:
        parser.error("give the folder gpu_check.sh wrote into")
    sys.stdout.write(summary(Path(args.work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
