"""Compile every registered kernel configuration for GPU targets, without a GPU.

    python -m matta.kernels.compile_check [--arch 90 80] [--filter SUBSTRING] [--json PATH] [--jobs N]
    python -m matta.kernels.compile_check --report [--filter SUBSTRING]

Triton lowers each spec to PTX and ptxas builds a cubin for the target, so a kernel that
cannot build for a GPU fails here and not on a lent machine. First, every configuration the
launchers can launch (each kernel module's `enumerate_launches()`) must be covered by a
registered spec (`CompileSpec.covers`), or the check fails before compiling anything. A spec
fails when it does not build, when shared memory exceeds the architecture's limit, when a
`uses_dot` kernel shows no `wgmma` on sm_90 (Hopper tensor cores), or when its sm_90 build
spills registers (stack frame or local memory, read from the cubin with cuobjdump). Spills on
sm_80 are reported only.

`--report` builds for sm_90 and prints, per spec, at the GPT-2 Medium MatTA shapes (16384
tokens, d 1024, FFN 4096/8192, V 50257) on an H100 (132 SMs): registers, shared memory,
blocks per SM, tiles (programs), waves, and an occupancy model's fraction of peak. The model
counts only occupancy and wave quantisation; a GPU timing replaces it.
Must run with TRITON_INTERPRET unset: the interpreter replaces the kernels with Python functions.
"""
import argparse
import concurrent.futures
import importlib
import json
import math
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

# Largest dynamic shared memory one block may use (bytes), from the CUDA programming guide.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}

# An H100 SXM for the report: per-SM limits (CUDA occupancy rules for compute capability 9.0).
H100 = {"sms": 132, "registers": 65536, "shared": 233472, "shared_reserved_per_block": 1024,
        "warps": 64, "blocks": 32}
# Resident warps per SM taken as enough to hide latency (two warpgroups of wgmma, or two
# blocks of loads in flight): fewer scale the model's estimate down in proportion.
SATURATING_WARPS = 8
TOKENS, D_MODEL, FFN_S, FFN_TA, VOCAB = 16384, 1024, 4096, 8192, 50257


def _import_all_kernel_modules():
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "compile_check":
            importlib.import_module(f"{__package__}.{module.name}")
    return package.COMPILE_SPECS


def unregistered_launches(specs) -> list:
    """The launches that kernel modules can make (their `enumerate_launches()`) which no
    registered spec covers: each would first compile on a GPU, unchecked."""
    package = importlib.import_module(__package__)
    launches = []
    for module in pkgutil.iter_modules(package.__path__):
        enumerate_launches = getattr(importlib.import_module(f"{__package__}.{module.name}"), "enumerate_launches", None)
        if enumerate_launches is not None:
            launches += enumerate_launches()
    return [launch for launch in dict.fromkeys(launches) if not any(spec.covers(launch) for spec in specs)]


def _resource_usage(cubin: bytes):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in usage.items()}


def compile_spec(spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"name": spec.name, "arch": arch, "ok": False, "num_warps": spec.options.get("num_warps", 4)}
    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(spec.fn, spec.signature, spec.constexprs, attrs), target=GPUTarget("cuda", arch, 32),
            options=spec.options,
        )
    except Exception as error:  # report every failing spec, not just the first
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
        return result
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["shared"] = compiled.metadata.shared
    result["wgmma"] = "wgmma" in compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"])
    problems = []
    if usage:
        result["registers"] = usage.get("reg")
        # ptxas spills registers to the stack frame; LOCAL counts other local memory.
        result["spill_bytes"] = usage.get("stack", 0) + usage.get("local", 0)
        if arch == 90 and result["spill_bytes"]:
            problems.append(f"spills {result['spill_bytes']} B on sm_90 ({result['registers']} registers)")
    else:
        problems.append("cannot read registers and spills: cuobjdump is missing from the triton wheel")
    if result["shared"] > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"shared memory {result['shared']} B > {SHARED_MEMORY_LIMIT[arch]} B")
    if arch == 90 and spec.uses_dot and not result["wgmma"]:
        problems.append("no wgmma in the sm_90 PTX")
    if problems:
        result["error"] = "; ".join(problems)
    else:
        result["ok"] = True
    return result


def _compile_indexed(job):
    index, arch = job
    return compile_spec(_import_all_kernel_modules()[index], arch)


def _compile_all(specs, archs, jobs):
    """Results in spec order, printed as they finish (forked workers share the imported specs)."""
    everything = _import_all_kernel_modules()
    work = [(everything.index(spec), arch) for spec in specs for arch in archs]
    if jobs <= 1:
        results = map(_compile_indexed, work)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile_indexed, work)
    out = []
    for r in results:
        out.append(r)
        status = "ok  " if r["ok"] else "FAIL"
        detail = f"shared {r['shared']:>6} B  regs {r.get('registers', '?'):>3}  spill {r.get('spill_bytes', '?')} B" \
            f"  {r['seconds']:5.1f} s{'  wgmma' if r.get('wgmma') else ''}" if "shared" in r else ""
        error = f"  {r['error']}" if r.get("error") else ""
        print(f"{status} sm_{r['arch']} {r['name']:<72} {detail}{error}", flush=True)
    return out


# ------------------------------------------------------------------------------------------
# The report: an occupancy model at the GPT-2 Medium MatTA shapes.


def blocks_per_sm(registers: int, shared: int, warps: int, gpu=H100) -> int:
    """Resident blocks per SM, limited by registers (allocated per warp in units of 256),
    shared memory (plus the 1 KiB the runtime reserves per block), warps and blocks."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = (gpu["registers"] // per_warp) // warps
    by_shared = gpu["shared"] // (shared + gpu["shared_reserved_per_block"])
    return max(0, min(by_registers, by_shared, gpu["warps"] // warps, gpu["blocks"]))


def _nested_linear_problems(spec):
    """(label, programs) where this variant runs in a GPT-2 Medium MatTA FFN (both streams'
    inputs 1024 wide; Student FFN 4096, TA 8192)."""
    from . import nested_linear

    c = spec.constexprs
    if "split_k_reduce" in spec.name:  # sums one 1024 x 1024 weight gradient
        return [("proj dW 1024x1024", math.ceil(D_MODEL * D_MODEL / c["BLOCK"]))]

    def tiles(p, q, split=1):
        return math.ceil(p / c["BLOCK_M"]) * math.ceil(q / c["BLOCK_N"]) * split

    kind = spec.name.split(".")[1]
    if kind.endswith("_split_k"):  # split-K runs where dW tiles are few: a 1024 x 1024 layer
        split = nested_linear.choose_split_k(D_MODEL, D_MODEL, TOKENS, H100["sms"])
        return [(f"proj dW 1024x1024, split {split}", tiles(D_MODEL, D_MODEL, split))]
    if kind.startswith("forward"):  # P tokens, Q outputs
        return [("ffn_up y", tiles(TOKENS, FFN_TA)), ("ffn_down y", tiles(TOKENS, D_MODEL))]
    if kind.startswith("grad_input"):  # P tokens, Q inputs
        return [("ffn_up dx", tiles(TOKENS, D_MODEL)), ("ffn_down dx", tiles(TOKENS, FFN_TA))]
    return [("ffn_up dW", tiles(FFN_TA, D_MODEL)), ("ffn_down dW", tiles(D_MODEL, FFN_TA))]


def _layer_norm_problems(spec):
    """Programs of the fused LayerNorm at GPT-2 Medium's residual stream (16384 rows of 1024)."""
    from . import layer_norm

    if spec.name.startswith("layer_norm.param_grads"):
        return [(f"dweight/dbias of {D_MODEL}", math.ceil(D_MODEL / layer_norm.REDUCE_BLOCK))]
    if spec.constexprs["BLOCK"] != layer_norm.block_for(D_MODEL):
        return [("rows wider than GPT-2 Medium's", None)]
    if spec.name.startswith("layer_norm.backward"):
        programs = layer_norm.backward_programs(TOKENS, D_MODEL, layer_norm.LaunchOptions(sm_count=H100["sms"]))
        return [(f"{TOKENS} rows x {D_MODEL}, {programs} programs", programs)]
    return [(f"{TOKENS} rows x {D_MODEL}", TOKENS)]


def report_problems(spec):
    """Where each kernel runs at the GPT-2 Medium MatTA shapes: [(label, programs or None)]."""
    if spec.name.startswith("nested_linear."):
        return _nested_linear_problems(spec)
    if spec.name.startswith("matta_loss"):  # one program per token row over V = 50257
        return [(f"{TOKENS} rows x V {VOCAB}", TOKENS)]
    if spec.name.startswith("layer_norm."):
        return _layer_norm_problems(spec)
    return [("one program per matrix", None)]  # the Newton roots: the batch sets the grid


def report_rows(specs, results, gpu=H100):
    by_name = {r["name"]: r for r in results if r["arch"] == 90}
    rows = []
    for spec in specs:
        r = by_name[spec.name]
        warps = r["num_warps"]
        blocks = blocks_per_sm(r["registers"], r["shared"], warps, gpu) if r.get("registers") else None
        for label, programs in report_problems(spec):
            row = {"name": spec.name, "problem": label, "registers": r.get("registers"), "shared": r.get("shared"),
                   "spill_bytes": r.get("spill_bytes"), "warps": warps, "blocks_per_sm": blocks, "tiles": programs,
                   "waves": None, "model_fraction_of_peak": None}
            if programs and blocks:
                slots = blocks * gpu["sms"]
                row["waves"] = programs / slots
                wave_efficiency = programs / (math.ceil(programs / slots) * slots)
                row["model_fraction_of_peak"] = wave_efficiency * min(1.0, blocks * warps / SATURATING_WARPS)
            rows.append(row)
    return rows


def print_report(rows):
    print(f"Occupancy model on an H100 ({H100['sms']} SMs) at GPT-2 Medium MatTA shapes: {TOKENS} tokens, "
          f"d {D_MODEL}, FFN {FFN_S}/{FFN_TA}, V {VOCAB}. 'model' = wave efficiency x min(1, resident warps / "
          f"{SATURATING_WARPS}): a model, not a measurement.\n")
    print("| kernel config | problem | regs | smem KiB | warps | blocks/SM | tiles | waves | model |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        print(f"| {r['name']} | {r['problem']} | {fmt(r['registers'], 'd')} | {fmt(r['shared'] / 1024, '.0f')} | "
              f"{r['warps']} | {fmt(r['blocks_per_sm'], 'd')} | {fmt(r['tiles'], 'd')} | {fmt(r['waves'], '.2f')} | "
              f"{fmt(r['model_fraction_of_peak'], '.2f')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--filter", default="", help="only specs whose name contains this")
    parser.add_argument("--json", help="write the results (and the report rows) here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--report", action="store_true",
                        help="build for sm_90 only and print the H100 occupancy table at GPT-2 Medium shapes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    everything = _import_all_kernel_modules()
    unregistered = unregistered_launches(everything)
    for launch in unregistered:
        print(f"NOT REGISTERED: {launch.describe()}")
    if unregistered:
        print(f"compile_check: {len(unregistered)} launchable configurations have no compile spec; register them "
              "(register_compile_spec) beside their launcher", file=sys.stderr)
        return 1
    specs = [s for s in everything if args.filter in s.name]
    if not specs:
        print(f"compile_check: no kernel spec matches {args.filter!r}", file=sys.stderr)
        return 2
    archs = [90] if args.report else args.arch
    results = _compile_all(specs, archs, args.jobs)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['name']}: {r['error']}")
    output = {"results": results}
    if args.report:
        output["report"] = report_rows([s for s in specs if any(r["name"] == s.name and "shared" in r for r in results)],
                                       results)
        print()
        print_report(output["report"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(output if args.report else results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
