"""Compile every registered kernel configuration for GPU targets, without a GPU.

    python -m matta.kernels.compile_check [--arch 90 80] [--filter SUBSTRING] [--json PATH]

Triton lowers each spec to PTX and ptxas builds a cubin for the target, so a kernel that
cannot build for a GPU fails here and not on a lent machine. Checks per spec and target:
it builds; a `uses_dot` kernel shows `wgmma` on sm_90 (Hopper tensor cores); shared memory
fits the architecture. Registers and spills (stack frame + local memory) are read from the
cubin with cuobjdump and reported, not failed: a spilling config is the autotuner's to drop. Must run with TRITON_INTERPRET unset: the interpreter replaces the
kernels with Python functions.
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

# Largest dynamic shared memory one block may use (bytes), from the CUDA programming guide.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


def _import_all_kernel_modules():
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "compile_check":
            importlib.import_module(f"{__package__}.{module.name}")
    return package.COMPILE_SPECS


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

    result = {"name": spec.name, "arch": arch, "ok": False}
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
    if usage:
        result["registers"] = usage.get("reg")
        # ptxas spills registers to the stack frame; LOCAL counts other local memory.
        result["spill_bytes"] = usage.get("stack", 0) + usage.get("local", 0)
    problems = []
    if result["shared"] > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"shared memory {result['shared']} B > {SHARED_MEMORY_LIMIT[arch]} B")
    if arch == 90 and spec.uses_dot and not result["wgmma"]:
        problems.append("no wgmma in the sm_90 PTX")
    if problems:
        result["error"] = "; ".join(problems)
    else:
        result["ok"] = True
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--filter", default="", help="only specs whose name contains this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    specs = [s for s in _import_all_kernel_modules() if args.filter in s.name]
    if not specs:
        print(f"compile_check: no kernel spec matches {args.filter!r}", file=sys.stderr)
        return 2
    results = []
    for spec in specs:
        for arch in args.arch:
            r = compile_spec(spec, arch)
            results.append(r)
            status = "ok  " if r["ok"] else "FAIL"
            detail = r.get("error") or (
                f"shared {r['shared']:>6} B  regs {r.get('registers', '?'):>3}  spill {r.get('spill_bytes', '?')} B"
                f"  {r['seconds']:5.1f} s{'  wgmma' if r.get('wgmma') else ''}"
            )
            print(f"{status} sm_{r['arch']} {r['name']:<64} {detail}", flush=True)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
