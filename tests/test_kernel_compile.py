"""Every registered Triton kernel configuration builds for Hopper (sm_90) and Ampere (sm_80),
without spilling on sm_90.

No GPU is needed: Triton lowers to PTX and ptxas assembles a cubin for the target. The check
runs in a subprocess because this test session runs the kernels through the interpreter.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest


def compile_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_every_kernel_config_compiles_for_gpus(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "matta.kernels.compile_check", "--jobs", "2", "--json", str(out)],
        env=compile_env(), capture_output=True, text=True, timeout=3600,
    )
    print(proc.stdout)
    results = json.loads(out.read_text())
    failed = "\n".join(f"sm_{r['arch']} {r['name']}: {r['error']}" for r in results if not r["ok"])
    assert proc.returncode == 0 and not failed, failed + "\n" + proc.stderr[-3000:]
    names = {r["name"] for r in results}
    assert any(name.startswith("nested_linear.") for name in names)
    for name in names:
        archs = {r["arch"] for r in results if r["name"] == name}
        assert archs == {80, 90}, (name, archs)
    assert all(r["spill_bytes"] == 0 for r in results if r["arch"] == 90)


def test_an_sm90_spill_fails_the_check():
    """A config needing 204 registers, capped at 128, spills; the check must call that a failure."""
    pytest.importorskip("triton")
    code = (
        "import dataclasses, json\n"
        "from matta.kernels import COMPILE_SPECS, compile_check\n"
        "import matta.kernels.nested_linear\n"
        "spec = next(s for s in COMPILE_SPECS if s.name.startswith('nested_linear.forward_two_inputs.bf16'))\n"
        "spec = dataclasses.replace(spec, options={**spec.options, 'maxnreg': 128})\n"
        "print(json.dumps(compile_check.compile_spec(spec, 90)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=compile_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["spill_bytes"] > 0 and not result["ok"], result
    assert "spills" in result["error"] and "sm_90" in result["error"]


def test_every_launchable_configuration_is_registered():
    """What the nested-linear launchers can launch (every layer kind, gradient set, split-K and
    operand kind, each autotuner tile) against the registered specs: each launch is covered,
    and taking a variant out of the registry shows up as uncovered launches."""
    pytest.importorskip("triton")
    from matta.kernels import COMPILE_SPECS, compile_check
    import matta.kernels.nested_linear as nested_linear

    launches = nested_linear.enumerate_launches()
    assert len(set(launches)) > 200
    assert compile_check.unregistered_launches(COMPILE_SPECS) == []
    # The one-input shared weight gradient (FOLD, SHARE_B, row sums) and the unshared one-input
    # input gradient (a separate B2) are among the launches.
    flags = [dict(launch.constexprs) for launch in launches]
    assert any(f["SUB_MODE"] == nested_linear.ADD and f["FOLD"] and f["SHARE_B"] and f["ROW_SUMS"] for f in flags)
    assert any(f["SUB_MODE"] == nested_linear.ADD and not f["FOLD"] and not f["SHARE_B"] and not f["ROW_SUMS"]
               and f.get("stride_ar") == 1 for f in flags)
    for dropped in ("grad_weight_shared_one_input.", "grad_input_one_input_unshared.", "grad_weight_plain_split_k.bf16"):
        kept = [s for s in COMPILE_SPECS if f".{dropped}" not in s.name]
        assert len(kept) < len(COMPILE_SPECS)
        assert compile_check.unregistered_launches(kept), dropped


def test_a_spec_covers_launches_without_its_epilogue_only():
    """A bias-and-row-sums build stands for the launches without them, not the reverse, and
    never for another tile or operand type."""
    pytest.importorskip("triton")
    from matta.kernels import COMPILE_SPECS
    import matta.kernels.nested_linear as nested_linear

    spec = next(s for s in COMPILE_SPECS if s.name.startswith("nested_linear.grad_weight_shared.bf16.128x128x64"))
    launch = next(l for l in nested_linear.enumerate_launches() if spec.covers(l))
    values = dict(launch.constexprs)

    def variant(**changes):
        return dataclasses.replace(launch, constexprs=tuple(sorted({**values, **changes}.items())))

    assert spec.covers(variant(ROW_SUMS=False, ROW_SUMS2=False))
    assert not spec.covers(variant(FOLD=True)) and not spec.covers(variant(BLOCK_K=32))
    assert not spec.covers(dataclasses.replace(launch, num_stages=4))
    assert not spec.covers(dataclasses.replace(launch, pointer_types=(("a_ptr", "*fp16"),)))
    no_sums = dataclasses.replace(spec, constexprs={**spec.constexprs, "ROW_SUMS": False})
    assert not no_sums.covers(variant(ROW_SUMS=True))


def test_occupancy_model():
    from matta.kernels.compile_check import H100, blocks_per_sm, report_problems

    # 8 warps at 204 registers and 144 KiB of shared memory: one block (shared memory bound).
    assert blocks_per_sm(204, 147456, 8) == 1
    # 4 warps at 96 registers and 64 KiB: three blocks (shared memory: 3 x 65 KiB <= 228 KiB).
    assert blocks_per_sm(96, 65536, 4) == 3
    # Register bound: 255 registers x 256 threads = one block; thread bound: 64 warps.
    assert blocks_per_sm(255, 0, 8) == 1 and blocks_per_sm(16, 0, 1) == H100["blocks"]
    pytest.importorskip("triton")
    from matta.kernels import COMPILE_SPECS
    import matta.kernels.nested_linear  # noqa: F401

    spec = next(s for s in COMPILE_SPECS if s.name.startswith("nested_linear.forward_two_inputs.bf16.128x128x64"))
    # y of the TA FFN up projection: 16384 x 8192 outputs in 128 x 128 tiles.
    assert report_problems(spec)[0] == ("ffn_up y", 128 * 64)


def test_kernels_only_import_as_a_matta_subpackage():
    """No matta module imports a top-level `kernels` (which could be a stranger's package)."""
    import ast
    import pathlib

    import matta.kernels
    import matta.kernels.nested_linear  # noqa: F401

    assert matta.kernels.__name__ == "matta.kernels"
    assert matta.kernels.nested_linear.__name__ == "matta.kernels.nested_linear"
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("matta/**/*.py"), *root.glob("kernels/**/*.py"), *root.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path}: {n}" for n in names if n == "kernels" or n.startswith("kernels.")]
    assert not offenders, offenders


def test_kernels_import_nothing_from_matta():
    """kernels/ sits below every other layer: it may import itself, triton, torch, never matta."""
    import ast
    import pathlib

    offenders = []
    for path in (pathlib.Path(__file__).resolve().parents[1] / "kernels").glob("**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.level == 0 and (node.module or "").startswith("matta"))):
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] == "matta"]
    assert not offenders, offenders
